"""Causal-LM examples packed into fixed-length rows.

Each document becomes [bos] + ids + [eos], cut into pieces of at most
seq_len + 1 tokens; a piece of L tokens yields L - 1 (input, target) pairs, so a
piece of seq_len + 1 tokens fills a row exactly. Pieces are placed best-fit (the
open row with the least room that still holds them, in document order): it is
deterministic and fills ~96% of the embedded corpus's rows with real tokens. Within a row, pieces are
told apart by `segment_ids` (1, 2, ...; 0 is padding) so attention can be masked
per document and `positions` restart at 0 for each piece.
"""

from __future__ import annotations

import bisect
import os
import pathlib
import zipfile
from typing import Optional, Sequence

import numpy as np

from llm.data import cache, sources
from llm.data.tokenizer import BOS_ID, EOS_ID, Tokenizer

FEATURES = ("inputs", "targets", "segment_ids", "positions", "weights")
# Bump when the packed layout changes, so stale cached arrays are not reused.
_PACK_VERSION = 1
_SCATTER_TOKENS = 1 << 22
_ENCODE_CHUNK = 8192  # documents per tokenizer call: bounds the memory of Python lists


def _with_specials(token_lists: Sequence[Sequence[int]], bos_id: Optional[int],
                   eos_id: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
  """All documents as one flat int32 array with bos/eos added, and their lengths."""
  prefix = [bos_id] if bos_id is not None and bos_id >= 0 else []
  suffix = [eos_id] if eos_id is not None and eos_id >= 0 else []
  parts = []
  for tokens in token_lists:
    parts.extend((prefix, np.asarray(tokens, np.int32).reshape(-1), suffix))
  lengths = np.array([len(t) + len(prefix) + len(suffix) for t in token_lists], np.int64)
  flat = np.concatenate([np.asarray(p, np.int32) for p in parts] or [np.zeros(0, np.int32)])
  return flat, lengths


def _pieces(lengths: np.ndarray, max_piece: int) -> tuple[np.ndarray, np.ndarray]:
  """(start in the flat array, length) of every piece with at least one target."""
  doc_starts = np.cumsum(lengths) - lengths
  counts = -(-lengths // max_piece)  # ceil
  doc_of_piece = np.repeat(np.arange(len(lengths)), counts)
  index_in_doc = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
  offsets = index_in_doc * max_piece
  starts = doc_starts[doc_of_piece] + offsets
  piece_lengths = np.minimum(max_piece, lengths[doc_of_piece] - offsets)
  keep = piece_lengths >= 2  # a 1-token remainder has no target to learn
  return starts[keep], piece_lengths[keep]


def _assign_rows(num_targets: np.ndarray, seq_len: int):
  """Best-fit placement: (row, offset, segment id) of each piece, and the row count."""
  free_sizes = []  # sorted distinct amounts of free room among open rows
  rows_by_free: dict[int, list[int]] = {}
  fill, segments = [], []
  rows = np.empty(len(num_targets), np.int64)
  offsets = np.empty(len(num_targets), np.int64)
  segment_ids = np.empty(len(num_targets), np.int32)
  for p, n in enumerate(num_targets.tolist()):
    i = bisect.bisect_left(free_sizes, n)
    if i == len(free_sizes):
      row = len(fill)
      fill.append(0)
      segments.append(0)
    else:
      bucket = rows_by_free[free_sizes[i]]
      row = bucket.pop()
      if not bucket:
        del rows_by_free[free_sizes[i]]
        free_sizes.pop(i)
    rows[p], offsets[p] = row, fill[row]
    fill[row] += n
    segments[row] += 1
    segment_ids[p] = segments[row]
    free = seq_len - fill[row]
    if free > 0:
      if free not in rows_by_free:
        rows_by_free[free] = []
        bisect.insort(free_sizes, free)
      rows_by_free[free].append(row)
  return rows, offsets, segment_ids, len(fill)


def _scatter(out, flat, seq_len, pieces: slice, starts, num_targets, rows, offsets,
             segment_of_piece):
  """Writes the pairs of `pieces` to their rows; positions count from each piece start."""
  counts = num_targets[pieces]
  piece = np.repeat(np.arange(pieces.start, pieces.stop), counts)
  position = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
  source = starts[piece] + position
  dest = rows[piece] * seq_len + offsets[piece] + position
  out["inputs"].reshape(-1)[dest] = flat[source]
  out["targets"].reshape(-1)[dest] = flat[source + 1]
  out["segment_ids"].reshape(-1)[dest] = segment_of_piece[piece]
  out["positions"].reshape(-1)[dest] = position
  out["weights"].reshape(-1)[dest] = 1.0


def pack_documents(token_lists: Sequence[Sequence[int]], seq_len: int,
                   bos_id: Optional[int] = BOS_ID,
                   eos_id: Optional[int] = EOS_ID) -> dict[str, np.ndarray]:
  """Packs tokenized documents (ids without bos/eos) into (N, seq_len) arrays."""
  if seq_len < 1:
    raise ValueError(f"config.data.seq_len={seq_len}: must be >= 1")
  flat, lengths = _with_specials(token_lists, bos_id, eos_id)
  starts, piece_lengths = _pieces(lengths, seq_len + 1)
  num_targets = piece_lengths - 1
  rows, offsets, segment_of_piece, num_rows = _assign_rows(num_targets, seq_len)

  out = {name: np.zeros((num_rows, seq_len), np.float32 if name == "weights" else np.int32)
         for name in FEATURES}
  # Scatter the (input, target) pairs vectorized, a bounded number of tokens at a
  # time so the int64 index arrays stay small however large the corpus.
  ends = np.cumsum(num_targets)
  first = 0
  while first < len(num_targets):
    last = max(first + 1, int(np.searchsorted(ends, ends[first] + _SCATTER_TOKENS)))
    _scatter(out, flat, seq_len, slice(first, last), starts, num_targets, rows, offsets,
             segment_of_piece)
    first = last
  return out


def tokenize_documents(tokenizer: Tokenizer, documents: Sequence[str]) -> list[np.ndarray]:
  """Token ids of each document, encoded in batches (much faster than one by one)."""
  token_arrays = []
  for start in range(0, len(documents), _ENCODE_CHUNK):
    batch = tokenizer.encode_batch(documents[start:start + _ENCODE_CHUNK])
    token_arrays.extend(np.asarray(ids, np.int32) for ids in batch)
  return token_arrays


def _dataset_path(data_cfg, tokenizer: Tokenizer, split: str,
                  cache_dir: Optional[str | os.PathLike]) -> pathlib.Path:
  key = cache.fingerprint(_PACK_VERSION, cache.bytes_digest(tokenizer.model_proto),
                          sources.source_fingerprint(data_cfg, split), data_cfg.seq_len)
  root = pathlib.Path(cache_dir) if cache_dir else cache.cache_dir("datasets")
  return root / f"{key}.npz"


def _read_cached(path: pathlib.Path, seq_len: int):
  """(arrays, None) if the cached .npz holds whole packed rows, else (None, why)."""
  try:
    with np.load(path) as cached:
      arrays = {name: cached[name] for name in FEATURES}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # truncated: EOF, zip
    return None, f"{type(e).__name__}: {e}"
  shapes = {name: a.shape for name, a in arrays.items()}
  rows = arrays["inputs"].shape[0] if arrays["inputs"].ndim == 2 else -1
  if set(shapes.values()) != {(rows, seq_len)}:
    return None, f"shapes {shapes}, not ({rows}, {seq_len}) each"
  return arrays, None


def build_dataset(data_cfg, tokenizer: Tokenizer, split: str,
                  cache_dir: Optional[str | os.PathLike] = None) -> dict[str, np.ndarray]:
  """Packed arrays of `split` (a name as in config.data.train_split / eval_split).

  Cached as .npz keyed by the tokenizer's bytes, the source, split, seq_len and
  max_documents, so later runs skip reading and tokenizing.
  """
  path = _dataset_path(data_cfg, tokenizer, split, cache_dir)
  if path.exists():
    arrays, why = _read_cached(path, data_cfg.seq_len)
    if arrays is not None:
      return arrays
    cache.report_corrupt(path, why)
  documents = sources.load_documents(data_cfg, split)
  if not documents:
    raise sources.DataError(f"split {split!r} of config.data.source={data_cfg.source!r} "
                            "has no documents")
  arrays = pack_documents(tokenize_documents(tokenizer, documents), data_cfg.seq_len,
                          bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
  cache.atomic_write(path, lambda f: np.savez(f, **arrays))
  return arrays
