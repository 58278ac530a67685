"""The shared on-disk cache for corpora, tokenizers and packed datasets.

Everything here is derived data: deleting the cache only costs time. Writes are
atomic (temp file + rename) because tests and several hosts may fill the same
cache at once, and a half-written file must never be read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any, Callable, Optional


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
  """Calls `write(file)` on a temp file next to `path`, then renames it into place."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
    os.chmod(tmp, 0o644)  # mkstemp makes files private; cache entries need not be
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def read_json(path: str | os.PathLike) -> Optional[Any]:
  """The cached JSON at `path`, or None if absent or unreadable (then rebuilt)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_json(path: str | os.PathLike, value: Any):
  atomic_write(path, lambda f: json.dump(value, f, ensure_ascii=False), mode="w")
