"""Where documents come from: `config.data.source` -> a list of strings.

Forms:
  embedded                   the corpus built from Python's own documentation
  embedded:topics | embedded:docstrings   one of its two domains (pydoc topics / docstrings)
  text:PATH[,PATH...]        plain text files or globs; documents are separated
                             by blank lines
  jsonl:PATH[,PATH...]       one JSON object per line, text under config.data.text_key
  tfds:NAME[/CONFIG][:VER]   a TFDS dataset already prepared under config.data.data_dir

Local sources have no split of their own, so a stable hash of each document's
text holds out ~2% of documents as "validation" (the rest is "train"). TFDS
split names are passed through verbatim (e.g. "train[:1%]").
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import os
import re
import sys
from typing import Any, Iterator, Optional

from llm.data import corpus

VALID_FORMS = ("embedded | text:PATH[,PATH...] | jsonl:PATH[,PATH...] | tfds:NAME[/CONFIG][:VERSION]"
               " | embedded:topics | embedded:docstrings")
LOCAL_VALIDATION_PERCENT = 2
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")
_GLOB_CHARS = re.compile(r"[*?\[]")


class DataError(ValueError):
  """A data source is misconfigured or missing; the message says what to set."""


def parse_source(source: str) -> tuple[str, str]:
  """("embedded" | "text" | "jsonl" | "tfds", argument) or a one-line DataError."""
  kind, sep, arg = source.partition(":")
  if kind == "embedded" and (not sep or arg in corpus.PARTS):
    return kind, arg
  if kind in ("text", "jsonl", "tfds") and arg.strip():
    return kind, arg.strip()
  raise DataError(f"config.data.source={source!r}: expected one of {VALID_FORMS}")


def local_split(data_cfg, split: str) -> str:
  """Maps a split name to "train"/"validation" for sources without named splits.

  The configured names map too, so a config written for TFDS (eval_split="test")
  still runs after switching to a local source.
  """
  if split in ("train", data_cfg.train_split):
    return "train"
  if split in ("validation", data_cfg.eval_split):
    return "validation"
  raise DataError(f"split {split!r} of config.data.source={data_cfg.source!r}: local sources "
                  "have only 'train' and 'validation'; set config.data.train_split / eval_split")


def resolve_paths(data_cfg, arg: str) -> list[str]:
  """The files named by a comma-separated list of paths / globs, in a fixed order."""
  paths = []
  for entry in (e.strip() for e in arg.split(",")):
    if not entry:
      continue
    pattern = os.path.expanduser(entry)
    if _GLOB_CHARS.search(pattern):
      matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
      if not matches:
        raise DataError(f"config.data.source={data_cfg.source!r}: no file matches {entry!r}")
      paths.extend(matches)
    elif os.path.isdir(pattern):
      raise DataError(f"config.data.source={data_cfg.source!r}: {entry!r} is a directory; "
                      f"name its files, e.g. {os.path.join(entry, '*.txt')!r}")
    elif not os.path.isfile(pattern):
      raise DataError(f"config.data.source={data_cfg.source!r}: no such file {entry!r}")
    else:
      paths.append(pattern)
  if not paths:
    raise DataError(f"config.data.source={data_cfg.source!r}: no files given")
  seen: dict[str, str] = {}
  for path in paths:  # a file read twice would be trained on twice as often, unasked
    real = os.path.realpath(path)
    if real in seen:
      also = "" if seen[real] == path else f" (also as {seen[real]!r})"
      raise DataError(f"config.data.source={data_cfg.source!r}: {path!r} is named twice{also}; "
                      "name each file once")
    seen[real] = path
  return paths


def _read_text(path: str, encoding: str = "utf-8") -> str:
  """The file's text; a file that cannot be read or decoded is a DataError naming it
  (bytes replaced by U+FFFD would train the model on garbage without a word)."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e.strerror or e}); check its permissions"
                    ) from None
  try:
    return raw.decode(encoding)
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path}: not valid {encoding} (byte 0x{raw[e.start]:02x} on line {line}); "
                    "convert the file, or set config.data.encoding to its encoding "
                    "(e.g. latin-1)") from None


def text_file_documents(path: str, encoding: str = "utf-8") -> list[str]:
  """A text file's paragraphs (separated by blank lines), stripped, non-empty."""
  return [d.strip() for d in _BLANK_LINES.split(_read_text(path, encoding)) if d.strip()]


def jsonl_values(path: str, encoding: str = "utf-8") -> Iterator[tuple[int, Any]]:
  """(line number, parsed JSON value) of each non-blank line of a JSONL file."""
  for number, line in enumerate(_read_text(path, encoding).split("\n"), start=1):
    if not line.strip():
      continue
    try:
      yield number, json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None


def jsonl_file_documents(path: str, text_key: str, encoding: str = "utf-8") -> list[str]:
  documents = []
  for number, record in jsonl_values(path, encoding):
    text = record.get(text_key) if isinstance(record, dict) else None
    if not isinstance(text, str):
      keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
      raise DataError(f"{path}:{number}: no string under config.data.text_key={text_key!r} "
                      f"(found: {keys})")
    if text.strip():
      documents.append(text)
  return documents


def hash_split(documents: list[str], percent: int) -> dict[str, list[str]]:
  """Splits by a stable hash of each text; never leaves validation empty when it
  can help it, because evaluation needs at least one document."""
  splits = corpus.split_documents(documents, percent)
  if not splits["validation"] and len(set(documents)) > 1:
    held_out = min(documents, key=corpus.text_hash)
    # Every copy of the held-out text leaves train, or evaluation would be on seen text.
    splits = {"train": [d for d in documents if d != held_out],
              "validation": [d for d in documents if d == held_out]}
  return splits


def _local_documents(data_cfg, kind: str, arg: str, split: str) -> list[str]:
  documents = []
  for path in resolve_paths(data_cfg, arg):
    if kind == "text":
      documents.extend(text_file_documents(path, data_cfg.encoding))
    else:
      documents.extend(jsonl_file_documents(path, data_cfg.text_key, data_cfg.encoding))
  return hash_split(documents, LOCAL_VALIDATION_PERCENT)[local_split(data_cfg, split)]


def _first_chars(documents: list[str], max_chars: Optional[int]) -> list[str]:
  if max_chars is None:
    return documents
  total = 0
  for i, text in enumerate(documents):
    total += len(text)
    if total >= max_chars:
      return documents[:i + 1]
  return documents


def load_documents(data_cfg, split: str, max_chars: Optional[int] = None) -> list[str]:
  """The documents of `split`: the first `max_documents` of them when that is > 0,
  and only as many as reach `max_chars` characters when that is given (enough
  to train a tokenizer, without reading all of a large dataset)."""
  kind, arg = parse_source(data_cfg.source)
  limit = data_cfg.max_documents if data_cfg.max_documents > 0 else None
  if data_cfg.sources:
    return _mixture_documents(data_cfg, split, max_chars)
  if kind == "embedded":
    documents = corpus.embedded_documents(local_split(data_cfg, split), arg)
  elif kind in ("text", "jsonl") and data_cfg.streaming:
    from llm.data import streaming  # pylint: disable=import-outside-toplevel
    return streaming.documents(data_cfg, split, max_chars)  # read lazily, up to max_chars
  elif kind in ("text", "jsonl"):
    documents = _local_documents(data_cfg, kind, arg, split)
  else:
    from llm.data import tfds_source  # pylint: disable=import-outside-toplevel
    return tfds_source.load(arg, split, data_dir=data_cfg.data_dir,
                            download=data_cfg.tfds_download, text_key=data_cfg.text_key,
                            limit=limit, max_chars=max_chars)
  return _first_chars(documents[:limit], max_chars)


def one_source(data_cfg, source: str):
  """The data config of one source of a mixture (`config.data.sources`)."""
  return dataclasses.replace(data_cfg, source=source, sources=())


def _mixture_documents(data_cfg, split: str, max_chars: Optional[int]) -> list[str]:
  """Every source's documents, taken in turn (weights are for sampling, not here), so
  the first `max_chars` (a tokenizer's training text) come from all of them."""
  parts = [load_documents(one_source(data_cfg, source), split, max_chars)
           for source, _ in data_cfg.sources]
  mixed = [doc for group in itertools.zip_longest(*parts) for doc in group if doc is not None]
  return _first_chars(mixed, max_chars)


def source_fingerprint(data_cfg, split: str) -> Any:
  """What the documents of `split` depend on, for cache keys.

  Local files enter by size and modification time, so editing one invalidates
  the caches built from it without hashing gigabytes on every start.
  """
  if data_cfg.sources:
    return {"sources": [source_fingerprint(one_source(data_cfg, s), split)
                        for s, _ in data_cfg.sources]}
  kind, arg = parse_source(data_cfg.source)
  parts: dict[str, Any] = {"source": data_cfg.source, "split": split,
                           "max_documents": data_cfg.max_documents}
  if kind == "embedded":
    parts.update(corpus=corpus.version_key(), python=sys.version)
  elif kind in ("text", "jsonl"):
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns)
             for p in resolve_paths(data_cfg, arg)]
    parts.update(files=stats, text_key=data_cfg.text_key,
                 split_percent=LOCAL_VALIDATION_PERCENT, encoding=data_cfg.encoding)
    if data_cfg.streaming:  # its documents are read in file order, without the fallback
      parts.update(streaming=True)
  else:
    parts.update(data_dir=data_cfg.data_dir, text_key=data_cfg.text_key)
  return parts
