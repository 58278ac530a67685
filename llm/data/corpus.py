"""The embedded default corpus: English text that ships with Python itself.

Every experiment must run offline with no dataset configured, so the default
corpus is built from the running interpreter's standard library: the pydoc topic
help (`pydoc_data/topics.py`) plus the docstrings of stdlib modules, classes and
functions. Nothing is imported -- some stdlib modules have side effects on import
(`antigravity` opens a browser, `this` prints) -- sources are parsed with `ast`.
No third-party text is stored in the repository; the corpus is rebuilt from the
local installation and cached, and is deterministic for a given Python build.
"""

from __future__ import annotations

import ast
import functools
import os
import sys
import sysconfig
import zlib
from typing import Iterator

from llm.data import cache

# Bump when the extraction rules change, so stale caches are not reused.
_CORPUS_VERSION = 1
_MIN_CHARS = 200  # shorter docstrings are mostly one-line signatures, not prose
_VALIDATION_PERCENT = 3  # ~50 KB held out: enough for a stable perplexity estimate
# Test suites, the IDE and third-party code are not the library's documentation;
# `pydoc_data` is read separately as the topic help.
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages",
                        "__pycache__", "turtledemo", "ensurepip", "pydoc_data",
                        "lib-dynload"})
SPLITS = ("train", "validation")
# Two domains of the corpus (for domain adaptation): the pydoc topic help (the language
# reference) and every other text (module, class and function docstrings).
PARTS = ("topics", "docstrings")


def _stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def _stdlib_sources(root: str) -> Iterator[str]:
  """Paths of stdlib .py files in a fixed (sorted) order."""
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs
                        if d not in _SKIP_DIRS and not d.startswith("config-"))
    for name in sorted(files):
      if name.endswith(".py"):
        yield os.path.join(directory, name)


def _docstrings(tree: ast.Module) -> Iterator[str]:
  """Docstrings of the module and of every class / function, in source order."""
  module_doc = ast.get_docstring(tree)
  if module_doc:
    yield module_doc
  stack = [iter(tree.body)]
  while stack:  # explicit stack: source order without recursion limits
    node = next(stack[-1], None)
    if node is None:
      stack.pop()
      continue
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      if doc:
        yield doc
      stack.append(iter(node.body))


def _topics(root: str) -> list[str]:
  """The pydoc topic help texts, sorted by topic name ([] if not installed)."""
  path = os.path.join(root, "pydoc_data", "topics.py")
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if (isinstance(node, ast.Assign) and len(node.targets) == 1
        and getattr(node.targets[0], "id", None) == "topics"):
      topics = ast.literal_eval(node.value)
      return [topics[k] for k in sorted(topics)]
  return []


def _file_docstrings(path: str) -> list[str]:
  try:
    with open(path, "rb") as f:
      tree = ast.parse(f.read(), filename=path)
  except (SyntaxError, ValueError, OSError):
    return []  # e.g. files kept for a different Python version
  return list(_docstrings(tree))


def build_documents(root: str | None = None) -> list[str]:
  """All corpus documents, uncached, deduplicated, in a deterministic order."""
  root = root or _stdlib_root()
  documents, seen = [], set()
  candidates = _topics(root)
  for path in _stdlib_sources(root):
    candidates.extend(_file_docstrings(path))
  for text in candidates:
    text = text.strip()
    if len(text) >= _MIN_CHARS and text not in seen:
      seen.add(text)
      documents.append(text)
  return documents


def text_hash(text: str) -> int:
  return zlib.crc32(text.encode("utf-8"))


def split_of(text: str, percent: int = _VALIDATION_PERCENT) -> str:
  """The split a document belongs to: a stable hash of its text, not its position,
  so adding or removing other documents never moves it."""
  return "validation" if text_hash(text) % 100 < percent else "train"


def split_documents(documents: list[str], percent: int = _VALIDATION_PERCENT
                   ) -> dict[str, list[str]]:
  splits = {name: [] for name in SPLITS}
  for text in documents:
    splits[split_of(text, percent)].append(text)
  return splits


def version_key() -> list:
  """What the corpus depends on besides the Python build (for cache keys)."""
  return [_CORPUS_VERSION, _MIN_CHARS, _VALIDATION_PERCENT]


def _cache_path():
  key = cache.fingerprint(version_key(), sys.version, _stdlib_root())
  return cache.cache_dir("corpus") / f"embedded-{key}.json"


@functools.lru_cache(maxsize=1)
def _topic_set(root: str) -> frozenset:
  return frozenset(text.strip() for text in _topics(root))


def embedded_documents(split: str, part: str = "") -> list[str]:
  """The embedded corpus's documents of `split` ("train" or "validation"); of one of
  its PARTS only when `part` is given (the split of each document stays the same)."""
  if part and part not in PARTS:
    raise ValueError(f"embedded corpus part {part!r}: must be one of {', '.join(PARTS)}")
  if split not in SPLITS:
    raise ValueError(f"embedded corpus split {split!r}: must be one of {', '.join(SPLITS)}")
  path = _cache_path()
  splits = cache.read_json(path)
  whole = isinstance(splits, dict) and set(splits) == set(SPLITS) and all(
      isinstance(docs, list) and all(isinstance(d, str) for d in docs) and docs
      for docs in splits.values())
  if not whole:
    if splits is not None:
      cache.report_corrupt(path, "not the corpus's splits")
    splits = split_documents(build_documents())
    cache.write_json(path, splits)
  if not part:
    return list(splits[split])
  topics = _topic_set(_stdlib_root())
  return [text for text in splits[split] if (text in topics) == (part == "topics")]
