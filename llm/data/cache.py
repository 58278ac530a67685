"""The shared on-disk cache for corpora, tokenizers and packed datasets.

Everything here is derived data: deleting the cache only costs time. Writes are
atomic (temp file + rename) because tests and several hosts may fill the same
cache at once, and a half-written file must never be read back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import uuid
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


def cache_dir(subdir: str = "") -> pathlib.Path:
  """`$LLM_CACHE` or `~/.cache/llm`, read on every call so tests can redirect it."""
  root = os.environ.get("LLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm")
  return pathlib.Path(root) / subdir if subdir else pathlib.Path(root)


def fingerprint(*parts: Any) -> str:
  """A short stable hash of JSON-able parts (the key of a cache entry)."""
  blob = json.dumps(parts, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:20]


def bytes_digest(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb"):
  """Calls `write(file)` on a temp file next to `path`, then renames it into place.

  The file gets the permissions the user's umask gives a new file (0o666 & ~umask),
  as `open` would: cache entries and workdir files are no more readable than that.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def report_corrupt(path: str | os.PathLike, why: str):
  """A cache entry that does not read back is rebuilt, never fatal: say so once."""
  log.warning("cache file %s is corrupt (%s); rebuilding it", path, why)


def read_json(path: str | os.PathLike) -> Optional[Any]:
  """The cached JSON at `path`, or None if absent or unreadable (then rebuilt)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    report_corrupt(path, f"{type(e).__name__}: {e}")
    return None


def write_json(path: str | os.PathLike, value: Any):
  atomic_write(path, lambda f: json.dump(value, f, ensure_ascii=False), mode="w")
