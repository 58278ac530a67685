"""Per-objective rows and per-step batches, called by the objectives (`llm.objectives`).

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
BatchFn = Callable[[Batch, int], Batch]


def packed_lm_rows(data_cfg, tokenizer: Tokenizer, split: str) -> Batch:
  """Documents packed into rows of seq_len with segment ids and positions (CLM, prefix LM)."""
  return packing.build_dataset(data_cfg, tokenizer, split)


def _token_lists(data_cfg, tokenizer: Tokenizer, split: str):
  return packing.tokenize_documents(tokenizer, sources.load_documents(data_cfg, split))


def mlm_rows(data_cfg, tokenizer: Tokenizer, split: str) -> Batch:
  return objectives.build_mlm_rows(_token_lists(data_cfg, tokenizer, split), data_cfg.seq_len,
                                   cls_id=tokenizer.bos_id, sep_id=tokenizer.eos_id,
                                   pad_id=tokenizer.pad_id)


def span_rows(data_cfg, tokenizer: Tokenizer, split: str) -> Batch:
  """Raw chunks long enough to become seq_len encoder tokens; the noise is drawn per batch."""
  tokens_length, _ = objectives.span_corruption_lengths(
      data_cfg.seq_len, data_cfg.noise_density, data_cfg.mean_span_length)
  return {"chunks": objectives.span_corruption_chunks(_token_lists(data_cfg, tokenizer, split),
                                                      tokens_length, tokenizer.eos_id,
                                                      tokenizer.pad_id)}


def identity_batch_fn(data_cfg, tokenizer: Tokenizer) -> BatchFn:
  return lambda rows, step: rows


def prefix_lm_batch_fn(data_cfg, tokenizer: Tokenizer) -> BatchFn:
  seed = data_cfg.shuffle_seed
  return lambda rows, step: objectives.prefix_lm_split(rows, np.random.default_rng([seed, step]))


def mlm_batch_fn(data_cfg, tokenizer: Tokenizer) -> BatchFn:
  seed, whole_words = data_cfg.shuffle_seed, data_cfg.whole_word_masking
  mask_kwargs = dict(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                     special_ids=objectives.special_ids(tokenizer),
                     mlm_probability=data_cfg.mlm_probability,
                     mask_ratio=data_cfg.mlm_mask_ratio, random_ratio=data_cfg.mlm_random_ratio)

  def mlm(rows, step):
    starts = objectives.word_starts(rows["tokens"], tokenizer) if whole_words else None
    return objectives.mlm_batch(rows, np.random.default_rng([seed, step]),
                                word_start_BT=starts, **mask_kwargs)
  return mlm


def span_batch_fn(data_cfg, tokenizer: Tokenizer) -> BatchFn:
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


def eval_set(make_batch: BatchFn, rows, batch_size: int, num_batches: int,
             process_index: int = 0, process_count: int = 1) -> list[Batch]:
  """Fixed evaluation batches (fixed masks too), the same at every evaluation; in a
  multi-process job each process holds its own rows of every batch."""
  from llm.data.iterator import eval_batches
  return [make_batch(batch, EVAL_STEP_BASE + i) for i, batch in enumerate(
      eval_batches(rows, batch_size, num_batches, process_index, process_count))]


EVAL_STEP_BASE = 1 << 30  # eval draws its masks from seeds no train step uses
