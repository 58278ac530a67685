"""Deduplication in two halves: a key per document, computed shard by shard in parallel,
then one pass over all keys in corpus order that keeps the first of each duplicate set
(so the result does not depend on the number of shards or processes).

Exact duplicates share the hash of their normalised text (case, punctuation and
whitespace folded, as CCNet does). Near duplicates are found with MinHash over word
n-gram shingles and locality-sensitive hashing (`datasketch`): a document is dropped
when an earlier kept one has an estimated Jaccard similarity >= the threshold.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Iterable, Mapping, Sequence

import numpy as np

_NON_WORD = re.compile(r"[\W_]+")
# 64-bit hashes: 32-bit ones (datasketch's default) collide visibly past ~1e5 shingles.
_SCHEME = "affine64"


def normalize(text: str) -> str:
  """NFKC, lower case, every run of punctuation / whitespace a single space."""
  return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def exact_key(text: str) -> str:
  return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=12).hexdigest()


def select_first(keys: Iterable[str]) -> list[bool]:
  """keep[i]: keys[i] was not seen before."""
  seen, keep = set(), []
  for key in keys:
    keep.append(key not in seen)
    seen.add(key)
  return keep


def shingles(text: str, n: int) -> set[bytes]:
  """Word n-grams of the normalised text (the whole text when it is shorter)."""
  ws = normalize(text).split()
  if len(ws) <= n:
    return {" ".join(ws).encode("utf-8")}
  return {" ".join(ws[i:i + n]).encode("utf-8") for i in range(len(ws) - n + 1)}


def minhash_signature(text: str, params: Mapping) -> np.ndarray:
  """The document's MinHash values, shape (num_perm,), uint64."""
  from datasketch import MinHash
  m = MinHash(num_perm=params["num_perm"], seed=params["seed"], scheme=_SCHEME)
  m.update_batch(sorted(shingles(text, params["ngram"])))
  return np.asarray(m.hashvalues, np.uint64)


def select_near(signatures_NP: np.ndarray, params: Mapping) -> list[bool]:
  """keep[i]: no earlier kept document is a near duplicate of document i.

  LSH proposes candidates; each is confirmed by its estimated Jaccard similarity, which
  removes the band collisions of dissimilar pairs. So the bands are chosen for recall
  (false negatives weigh 0.9): at threshold 0.7 and 128 permutations that is 20 bands of
  6 rows, which proposes a pair of similarity 0.8 with probability 0.998 (datasketch's
  even weighting: 14 bands of 9, 0.87).
  """
  from datasketch import MinHash, MinHashLSH
  num_perm, threshold = params["num_perm"], params["threshold"]
  lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
  kept: dict[str, MinHash] = {}
  keep = []
  for i, values in enumerate(signatures_NP):
    m = MinHash(num_perm=num_perm, seed=params["seed"], hashvalues=values, scheme=_SCHEME)
    duplicate = any(m.jaccard(kept[c]) >= threshold for c in lsh.query(m))
    if not duplicate:
      key = str(i)
      lsh.insert(key, m)
      kept[key] = m
    keep.append(not duplicate)
  return keep


def jaccard(a: Sequence[str] | set, b: Sequence[str] | set) -> float:
  """Exact Jaccard similarity of two sets (for checking the MinHash estimate)."""
  a, b = set(a), set(b)
  return len(a & b) / len(a | b) if a | b else 1.0
