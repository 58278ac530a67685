"""Pretraining objectives built on the host: BERT masking, T5 span corruption, prefix LM.

Rows are built once per dataset (packing is slow and cacheable); the noise is drawn
per batch from a numpy Generator, so every epoch sees fresh masks (RoBERTa's dynamic
masking) and a batch is a pure function of (rows, seed). Everything is vectorized
over the batch: a 32x256 batch takes well under a millisecond.

Einsum letters: B rows, T row length, V vocabulary, W words, S spans.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np

from llm.data import packing
from llm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

WORD_START = "\u2581"  # SentencePiece's "▁": the piece follows a space


# --- validation ---------------------------------------------------------------

def _require_open_unit(value: float, field: str):
  if not 0.0 < value < 1.0:  # also rejects NaN
    raise ValueError(f"config.data.{field}={value}: must be in (0, 1)")


def _check_mlm(mlm_probability: float, mask_ratio: float, random_ratio: float):
  _require_open_unit(mlm_probability, "mlm_probability")
  for value, field in ((mask_ratio, "mlm_mask_ratio"), (random_ratio, "mlm_random_ratio")):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"config.data.{field}={value}: must be in [0, 1]")
  if mask_ratio + random_ratio > 1.0:
    raise ValueError(f"config.data.mlm_random_ratio={random_ratio}: mlm_mask_ratio + "
                     f"mlm_random_ratio must be <= 1 (is {mask_ratio + random_ratio})")


def _check_spans(noise_density: float, mean_span_length: float):
  _require_open_unit(noise_density, "noise_density")
  if not mean_span_length >= 1.0:
    raise ValueError(f"config.data.mean_span_length={mean_span_length}: must be >= 1")


# --- masked LM (BERT) ---------------------------------------------------------

def special_ids(tokenizer) -> list[int]:
  """Ids never masked nor drawn as random replacements: pad/eos/bos/unk, mask, sentinels."""
  ids = [tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id,
         tokenizer.mask_id, *tokenizer.sentinel_ids]
  return sorted({i for i in ids if i is not None and i >= 0})


@functools.lru_cache(maxsize=8)
def word_start_table(tokenizer) -> np.ndarray:
  """bool[V]: the piece starts a word. Built once per tokenizer (a Python loop over V)."""
  table_V = np.array([tokenizer.id_to_piece(i).startswith(WORD_START)
                      for i in range(tokenizer.vocab_size)], bool)
  table_V.flags.writeable = False  # shared by every caller through the cache
  return table_V


def word_starts(tokens_BT: np.ndarray, tokenizer) -> np.ndarray:
  """bool (B, T): True where a token's piece starts with "▁" (a new word)."""
  return word_start_table(tokenizer)[np.asarray(tokens_BT)]


def _word_ids(word_start_BT: np.ndarray, eligible_BT: np.ndarray) -> np.ndarray:
  """Index of each token's word, flat over the batch.

  Every ineligible token is a word of its own and ends the word before it, so no
  word spans a special token, padding or a row boundary.
  """
  start_BT = np.asarray(word_start_BT, bool) | ~eligible_BT
  start_BT[:, 1:] |= ~eligible_BT[:, :-1]
  start_BT[:, 0] = True
  return np.cumsum(start_BT.ravel()).reshape(start_BT.shape) - 1


def mlm_mask(tokens_BT: np.ndarray, rng, *, mask_id: int, vocab_size: int,
             special_ids: Sequence[int], mlm_probability: float = 0.15,
             mask_ratio: float = 0.8, random_ratio: float = 0.1,
             word_start_BT: Optional[np.ndarray] = None,
             valid_BT: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
  """BERT masking: dict(inputs, targets, weights), each (B, T).

  Each eligible token (not special, not mask, `valid_BT` where given) is selected
  independently with `mlm_probability` -- or, with `word_start_BT`, each word is, so
  whole words go together and still ~mlm_probability of the tokens are selected.
  Of the selected tokens, `mask_ratio` become `mask_id`, `random_ratio` a random
  non-special token, the rest stay; the loss (weights) is on selected tokens only.
  `rng` is a numpy Generator or a seed.
  """
  _check_mlm(mlm_probability, mask_ratio, random_ratio)
  rng = np.random.default_rng(rng)
  tokens_BT = np.asarray(tokens_BT)
  special_V = np.zeros(vocab_size, bool)
  special_V[np.asarray([*special_ids, mask_id], np.int64)] = True
  eligible_BT = ~special_V[tokens_BT]
  if valid_BT is not None:
    eligible_BT &= np.asarray(valid_BT, bool)
  if word_start_BT is None:
    selected_BT = eligible_BT & (rng.random(tokens_BT.shape) < mlm_probability)
  else:
    # A word selected with probability p selects p of the tokens in expectation,
    # whatever the word lengths.
    word_BT = _word_ids(word_start_BT, eligible_BT)
    draw_W = rng.random(int(word_BT.max()) + 1 if word_BT.size else 0)
    selected_BT = eligible_BT & (draw_W[word_BT] < mlm_probability)
  action_BT = rng.random(tokens_BT.shape)
  masked_BT = selected_BT & (action_BT < mask_ratio)
  randomized_BT = selected_BT & ~masked_BT & (action_BT < mask_ratio + random_ratio)
  candidates = np.flatnonzero(~special_V)
  inputs_BT = np.where(masked_BT, mask_id, tokens_BT)
  if candidates.size:
    random_BT = candidates[rng.integers(candidates.size, size=tokens_BT.shape)]
    inputs_BT = np.where(randomized_BT, random_BT, inputs_BT)
  elif randomized_BT.any():
    raise ValueError(f"no non-special token among the {vocab_size} to draw replacements "
                     "from; set config.data.mlm_random_ratio=0")
  return {"inputs": inputs_BT.astype(np.int32), "targets": tokens_BT.astype(np.int32),
          "weights": selected_BT.astype(np.float32)}


def _blocks(sizes: np.ndarray, max_tokens: int = 1 << 22):
  """Consecutive piece ranges of about `max_tokens` tokens: bounds the index arrays."""
  ends = np.cumsum(sizes)
  first = 0
  while first < len(sizes):
    last = max(first + 1, int(np.searchsorted(ends, ends[first] + max_tokens)))
    yield first, last
    first = last


def _spread(sizes: np.ndarray, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
  """(piece, position in piece) of every token of pieces [first, last)."""
  counts = sizes[first:last]
  piece = np.repeat(np.arange(first, last), counts)
  position = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
  return piece, position


def build_mlm_rows(token_lists: Sequence[Sequence[int]], seq_len: int, cls_id: int = BOS_ID,
                   sep_id: int = EOS_ID, pad_id: int = PAD_ID) -> dict[str, np.ndarray]:
  """Documents (ids without specials) packed into dict(tokens, segment_ids, positions).

  Each piece of at most seq_len - 2 ids becomes [CLS] ids [SEP] (bos and eos play
  CLS and SEP); pieces share rows best-fit as in `packing`, segment ids 1, 2, ... tell
  them apart (0 is padding) so the encoder attends within a piece, and positions
  restart at 0 at each [CLS]. A 1-id remainder of a document is dropped, as in
  `packing`. Mask per batch with `mlm_batch`, so every epoch sees fresh masks.
  """
  if seq_len < 3:
    raise ValueError(f"config.data.seq_len={seq_len}: MLM rows need >= 3 ([CLS] id [SEP])")
  flat, lengths = packing._with_specials(token_lists, None, None)
  starts, piece_lengths = packing._pieces(lengths, seq_len - 2)
  sizes = piece_lengths + 2
  rows, offsets, segment_of_piece, num_rows = packing._assign_rows(sizes, seq_len)
  out = {"tokens": np.full((num_rows, seq_len), pad_id, np.int32),
         "segment_ids": np.zeros((num_rows, seq_len), np.int32),
         "positions": np.zeros((num_rows, seq_len), np.int32)}
  for first, last in _blocks(sizes):
    piece, position = _spread(sizes, first, last)
    source = np.clip(starts[piece] + position - 1, 0, max(len(flat) - 1, 0))
    values = np.where(position == 0, cls_id,
                      np.where(position == sizes[piece] - 1, sep_id, flat[source]))
    dest = rows[piece] * seq_len + offsets[piece] + position
    out["tokens"].reshape(-1)[dest] = values
    out["segment_ids"].reshape(-1)[dest] = segment_of_piece[piece]
    out["positions"].reshape(-1)[dest] = position
  return out


def mlm_batch(rows: dict[str, np.ndarray], rng, *, word_start_BT=None,
              **mask_kwargs) -> dict[str, np.ndarray]:
  """A batch of `build_mlm_rows` rows masked by `mlm_mask` (padding never selected)."""
  masked = mlm_mask(rows["tokens"], rng, word_start_BT=word_start_BT,
                    valid_BT=rows["segment_ids"] != 0, **mask_kwargs)
  return {**masked, "segment_ids": rows["segment_ids"], "positions": rows["positions"]}


# --- span corruption (T5) -----------------------------------------------------

def _span_counts(length: int, noise_density: float, mean_span_length: float):
  """(noise tokens, noise spans) of a `length`-token sequence, as T5 rounds them."""
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_span_length)), 1)
  # Spans alternate non-noise / noise, so neither kind can have more runs than tokens.
  return num_noise, min(num_spans, num_noise, length - num_noise)


def _output_lengths(length: int, noise_density: float, mean_span_length: float):
  """(encoder, decoder) lengths, eos included, of a corrupted `length`-token chunk."""
  num_noise, num_spans = _span_counts(length, noise_density, mean_span_length)
  return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_lengths(inputs_length: int, noise_density: float = 0.15,
                            mean_span_length: float = 3.0) -> tuple[int, int]:
  """(tokens_length, targets_length): raw chunks of tokens_length corrupt to exactly
  `inputs_length` encoder tokens and targets_length decoder tokens (T5's
  random_spans_helper, without its noise_density=0.5 adjustment).

  Only when spans would outnumber the kept tokens (e.g. noise_density >= 0.5 with
  mean_span_length 1) can the encoder length skip a value; it is then the longest
  below inputs_length, and `build_span_corruption_rows` pads.
  """
  _check_spans(noise_density, mean_span_length)
  if inputs_length < 3:
    raise ValueError(f"config.data.seq_len={inputs_length}: span corruption needs >= 3 "
                     "encoder tokens (a kept token, a sentinel, eos)")
  # The encoder length grows by 0 or 1 per raw token, so (but for the clamp on the
  # number of spans) every length is reached.
  tokens_length = 2
  while _output_lengths(tokens_length + 1, noise_density, mean_span_length)[0] <= inputs_length:
    tokens_length += 1
  return tokens_length, _output_lengths(tokens_length, noise_density, mean_span_length)[1]


def _random_segmentation(num_rows: int, num_items: int, num_segments: int, rng):
  """(num_rows, num_segments) lengths of uniformly random splits into non-empty runs."""
  # A random permutation's values below num_segments - 1 mark that many random gaps.
  order = np.argsort(rng.random((num_rows, num_items - 1)), axis=1)
  first_BI = np.concatenate([np.ones((num_rows, 1), bool), order < num_segments - 1], axis=1)
  starts = np.nonzero(first_BI)[1].reshape(num_rows, num_segments)
  return np.diff(starts, axis=1, append=num_items)


def random_spans_noise_masks(num_rows: int, length: int, rng, noise_density: float = 0.15,
                             mean_span_length: float = 3.0) -> np.ndarray:
  """bool (num_rows, length), True on noise: T5's random_spans_noise_mask per row.

  round(length * noise_density) noise tokens in round(noise / mean_span_length) spans,
  span lengths a uniformly random composition, alternating with non-noise runs and
  starting with one, so every row has the same counts but different spans.
  """
  _check_spans(noise_density, mean_span_length)
  if length < 2:
    raise ValueError(f"span corruption needs >= 2 tokens, got length={length}")
  rng = np.random.default_rng(rng)
  num_noise, num_spans = _span_counts(length, noise_density, mean_span_length)
  noise_BS = _random_segmentation(num_rows, num_noise, num_spans, rng)
  kept_BS = _random_segmentation(num_rows, length - num_noise, num_spans, rng)
  runs = np.stack([kept_BS, noise_BS], axis=2).reshape(num_rows, 2 * num_spans)
  run_starts = np.cumsum(runs, axis=1)[:, :-1]
  boundary_BT = np.zeros((num_rows, length), np.int32)
  boundary_BT[np.arange(num_rows)[:, None], run_starts] = 1
  return np.cumsum(boundary_BT, axis=1) % 2 == 1


def random_spans_noise_mask(length: int, rng, noise_density: float = 0.15,
                            mean_span_length: float = 3.0) -> np.ndarray:
  """bool (length,): one row of `random_spans_noise_masks`."""
  return random_spans_noise_masks(1, length, rng, noise_density, mean_span_length)[0]


def _corrupt(tokens_BT, noise_BT, sentinel_ids, eos_id):
  """(encoder, decoder) arrays, eos appended; every row must have the same counts.

  Each noise span becomes one sentinel in the encoder input; the decoder target is
  each span's sentinel followed by the span, so sentinels number spans in order.
  """
  num_rows = len(tokens_BT)
  span_start_BT = noise_BT.copy()
  span_start_BT[:, 1:] &= ~noise_BT[:, :-1]
  span_BT = np.cumsum(span_start_BT, axis=1) - 1
  sentinels = np.asarray(sentinel_ids, np.int32)
  if span_BT.size and span_BT.max() >= len(sentinels):
    raise ValueError(f"{span_BT.max() + 1} noise spans need as many sentinels but the "
                     f"tokenizer has {len(sentinels)}; raise config.data.num_sentinels")
  sentinel_BT = sentinels[np.clip(span_BT, 0, None)]
  encoder = np.where(span_start_BT, sentinel_BT, tokens_BT)[~noise_BT | span_start_BT]
  # A slot for a sentinel before every token: kept before span starts only.
  slots_BT2 = np.stack([sentinel_BT, tokens_BT], axis=2)
  keep_BT2 = np.stack([span_start_BT, noise_BT], axis=2)
  decoder = slots_BT2[keep_BT2]
  eos = np.full((num_rows, 1), eos_id, np.int32)
  return (np.concatenate([encoder.reshape(num_rows, -1), eos], axis=1),
          np.concatenate([decoder.reshape(num_rows, -1), eos], axis=1))


def span_corruption(tokens: Sequence[int], rng, sentinel_ids: Sequence[int], eos_id: int = EOS_ID,
                    noise_density: float = 0.15, mean_span_length: float = 3.0):
  """(encoder_inputs, decoder_targets) of one sequence, both ending in eos."""
  tokens_1T = np.asarray(tokens, np.int32).reshape(1, -1)
  noise_1T = random_spans_noise_masks(1, tokens_1T.shape[1], rng, noise_density,
                                      mean_span_length)
  encoder, decoder = _corrupt(tokens_1T, noise_1T, sentinel_ids, eos_id)
  return encoder[0], decoder[0]


def span_corruption_chunks(token_lists: Sequence[Sequence[int]], tokens_length: int,
                           eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> np.ndarray:
  """(N, tokens_length) raw chunks of the documents, concatenated with eos after each.

  As in T5, examples are not packed; the last chunk is padded with pad_id (dropped
  when shorter than 2 tokens, which cannot be corrupted).
  """
  flat, _ = packing._with_specials(token_lists, None, eos_id)
  num_full, rest = divmod(len(flat), tokens_length)
  chunks = flat[:num_full * tokens_length].reshape(num_full, tokens_length)
  if rest >= 2:
    last = np.full((1, tokens_length), pad_id, np.int32)
    last[0, :rest] = flat[num_full * tokens_length:]
    chunks = np.concatenate([chunks, last])
  return chunks


def corrupt_spans(chunks_BL: np.ndarray, rng, sentinel_ids: Sequence[int], eos_id: int = EOS_ID,
                  pad_id: int = PAD_ID, noise_density: float = 0.15,
                  mean_span_length: float = 3.0) -> dict[str, np.ndarray]:
  """Span-corrupted encoder-decoder batch from raw chunks, right-padded with pad_id
  (which must not occur in the text; a row's length is its count of other ids).

  decoder_inputs are the targets shifted right behind pad_id, T5's decoder start.
  """
  _check_spans(noise_density, mean_span_length)
  rng = np.random.default_rng(rng)
  chunks_BL = np.asarray(chunks_BL, np.int32)
  num_rows, length = chunks_BL.shape
  inputs_length, targets_length = _output_lengths(length, noise_density, mean_span_length)
  encoder_BT = np.full((num_rows, inputs_length), pad_id, np.int32)
  targets_BT = np.full((num_rows, targets_length), pad_id, np.int32)
  lengths_B = (chunks_BL != pad_id).sum(axis=1)
  # Rows of equal length share their counts, so each group corrupts in one go.
  for row_length in np.unique(lengths_B[lengths_B >= 2]):
    rows = np.flatnonzero(lengths_B == row_length)
    noise = random_spans_noise_masks(len(rows), int(row_length), rng, noise_density,
                                     mean_span_length)
    encoder, decoder = _corrupt(chunks_BL[rows, :row_length], noise, sentinel_ids, eos_id)
    encoder_BT[rows, :encoder.shape[1]] = encoder
    targets_BT[rows, :decoder.shape[1]] = decoder
  decoder_inputs_BT = np.full_like(targets_BT, pad_id)
  decoder_inputs_BT[:, 1:] = targets_BT[:, :-1]
  return {"encoder_inputs": encoder_BT,
          "encoder_segment_ids": (encoder_BT != pad_id).astype(np.int32),
          "decoder_inputs": decoder_inputs_BT,
          "decoder_targets": targets_BT,
          "decoder_segment_ids": (targets_BT != pad_id).astype(np.int32),
          "decoder_weights": (targets_BT != pad_id).astype(np.float32)}


def build_span_corruption_rows(token_lists: Sequence[Sequence[int]], inputs_length: int, rng,
                               sentinel_ids: Sequence[int], eos_id: int = EOS_ID,
                               pad_id: int = PAD_ID, noise_density: float = 0.15,
                               mean_span_length: float = 3.0) -> dict[str, np.ndarray]:
  """Chunks of the documents corrupted once: encoder rows of exactly `inputs_length`.

  For fresh noise every epoch, keep `span_corruption_chunks` and call
  `corrupt_spans` per batch instead.
  """
  tokens_length, _ = span_corruption_lengths(inputs_length, noise_density, mean_span_length)
  chunks = span_corruption_chunks(token_lists, tokens_length, eos_id, pad_id)
  out = corrupt_spans(chunks, rng, sentinel_ids, eos_id, pad_id, noise_density,
                      mean_span_length)
  missing = inputs_length - out["encoder_inputs"].shape[1]
  for name, value in (("encoder_inputs", pad_id), ("encoder_segment_ids", 0)):
    out[name] = np.pad(out[name], ((0, 0), (0, missing)), constant_values=value)
  return out


# --- prefix LM ----------------------------------------------------------------

def prefix_lm_split(rows: dict[str, np.ndarray], rng) -> dict[str, np.ndarray]:
  """Adds a random bidirectional prefix to every packed causal-LM piece.

  A piece of n input positions gets a prefix of k ~ U{1..n} positions, marked in
  `prefix` for `llm.objectives.prefix_lm_mask`. The loss keeps only targets after
  the prefix: the last prefix position predicts the first suffix token, which no
  prefix position sees, while earlier prefix targets are visible to the prefix.
  """
  rng = np.random.default_rng(rng)
  segment_BT, position_BT = rows["segment_ids"], rows["positions"]
  num_segments = int(segment_BT.max(initial=0)) + 1
  piece_BT = np.arange(len(segment_BT))[:, None] * num_segments + segment_BT
  size_P = np.bincount(piece_BT.ravel(), minlength=len(segment_BT) * num_segments)
  prefix_len_P = 1 + np.floor(rng.random(size_P.shape) * size_P).astype(np.int64)
  prefix_len_BT = prefix_len_P[piece_BT]
  prefix_BT = (position_BT < prefix_len_BT) & (segment_BT != 0)
  weights_BT = rows["weights"] * (position_BT >= prefix_len_BT - 1)
  return {**rows, "weights": weights_BT.astype(np.float32), "prefix": prefix_BT}


def prefix_lm_rows(token_lists: Sequence[Sequence[int]], seq_len: int, rng,
                   bos_id: Optional[int] = BOS_ID,
                   eos_id: Optional[int] = EOS_ID) -> dict[str, np.ndarray]:
  """Causal-LM rows (`packing.pack_documents`) with a random prefix per piece:
  dict(inputs, targets, segment_ids, positions, weights, prefix)."""
  return prefix_lm_split(packing.pack_documents(token_lists, seq_len, bos_id, eos_id), rng)
