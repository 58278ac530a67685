"""Objective-specific rows and per-step batches: the one place the loop asks for data.

Rows are built once per split (cached where building is slow); randomness that
should differ per epoch (MLM masks) is drawn per batch from a generator seeded by
(shuffle_seed, step), so a resumed run reproduces its batches exactly.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from llm.data import objectives, packing, sources
from llm.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


def build_rows(data_cfg, tokenizer: Tokenizer, split: str) -> dict[str, np.ndarray]:
  if data_cfg.objective in ("clm", "prefix_lm"):
    return packing.build_dataset(data_cfg, tokenizer, split)
  documents = sources.load_documents(data_cfg, split)
  token_lists = packing.tokenize_documents(tokenizer, documents)
  if data_cfg.objective == "span":  # raw chunks; the noise is drawn per batch
    tokens_length, _ = objectives.span_corruption_lengths(
        data_cfg.seq_len, data_cfg.noise_density, data_cfg.mean_span_length)
    return {"chunks": objectives.span_corruption_chunks(token_lists, tokens_length,
                                                        tokenizer.eos_id, tokenizer.pad_id)}
  return objectives.build_mlm_rows(token_lists, data_cfg.seq_len, cls_id=tokenizer.bos_id,
                                   sep_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)


def batch_fn(data_cfg, tokenizer: Tokenizer) -> Callable[[Batch, int], Batch]:
  """(rows of one batch, step) -> the model's batch: inputs, targets, weights, ..."""
  seed = data_cfg.shuffle_seed
  if data_cfg.objective == "clm":
    return lambda rows, step: rows
  if data_cfg.objective == "span":
    return _span_batch_fn(data_cfg, tokenizer)
  if data_cfg.objective == "prefix_lm":
    return lambda rows, step: objectives.prefix_lm_split(rows, np.random.default_rng([seed,
                                                                                       step]))
  whole_words = data_cfg.whole_word_masking
  mask_kwargs = dict(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                     special_ids=objectives.special_ids(tokenizer),
                     mlm_probability=data_cfg.mlm_probability,
                     mask_ratio=data_cfg.mlm_mask_ratio, random_ratio=data_cfg.mlm_random_ratio)

  def mlm(rows, step):
    starts = objectives.word_starts(rows["tokens"], tokenizer) if whole_words else None
    return objectives.mlm_batch(rows, np.random.default_rng([seed, step]),
                                word_start_BT=starts, **mask_kwargs)
  return mlm


def _span_batch_fn(data_cfg, tokenizer: Tokenizer):
  seed = data_cfg.shuffle_seed

  def span(rows, step):
    out = objectives.corrupt_spans(rows["chunks"], np.random.default_rng([seed, step]),
                                   tokenizer.sentinel_ids, tokenizer.eos_id, tokenizer.pad_id,
                                   data_cfg.noise_density, data_cfg.mean_span_length)
    missing = data_cfg.seq_len - out["encoder_inputs"].shape[1]  # rare: keep shapes fixed
    pad = lambda x: np.pad(x, ((0, 0), (0, max(missing, 0))))
    return {"encoder_inputs": pad(out["encoder_inputs"]),
            "encoder_segment_ids": pad(out["encoder_segment_ids"]),
            "inputs": out["decoder_inputs"], "targets": out["decoder_targets"],
            "segment_ids": out["decoder_segment_ids"], "weights": out["decoder_weights"]}
  return span


def eval_set(data_cfg, tokenizer: Tokenizer, rows, batch_size: int, num_batches: int):
  """Fixed evaluation batches (fixed masks too), the same at every evaluation."""
  from llm.data.iterator import eval_batches
  make = batch_fn(data_cfg, tokenizer)
  return [make(batch, EVAL_STEP_BASE + i)
          for i, batch in enumerate(eval_batches(rows, batch_size, num_batches))]


EVAL_STEP_BASE = 1 << 30  # eval draws its masks from seeds no train step uses
