"""Preference pairs as model rows: [bos] prompt completion [eos] per side (what a reward
model reads), shared by the reward model, DPO and the rater."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from llm.config import ConfigError
from llm.data.preferences import preference_pairs

SIDES = ("chosen", "rejected")


def text_rows(prompts: Sequence[str], completions: Sequence[str], tokenizer,
              seq_len: int) -> dict[str, np.ndarray]:
  """[bos] prompt completion [eos] per row, right-padded (segment 0); a row too long loses
  prompt tokens from the left, so the completion and its end are always seen."""
  prompt_ids = tokenizer.encode_batch(list(prompts))
  completion_ids = tokenizer.encode_batch(list(completions))
  return token_rows([[tokenizer.bos_id, *p] for p in prompt_ids],
                    [[*c, tokenizer.eos_id] for c in completion_ids], seq_len,
                    tokenizer.pad_id)


def token_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  tokens = np.full((len(prompts), seq_len), pad_id, np.int32)
  segments = np.zeros((len(prompts), seq_len), np.int32)
  for row, (prompt, completion) in enumerate(zip(prompts, completions)):
    if len(completion) >= seq_len:
      raise ConfigError(f"example {row}: its completion takes {len(completion)} tokens, "
                        f"data.seq_len={seq_len}; raise data.seq_len")
    ids = [*prompt[max(0, len(prompt) + len(completion) - seq_len):], *completion]
    tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1
  return {"inputs": tokens, "segment_ids": segments}


def pair_rows(pairs, tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """chosen_* and rejected_* rows (inputs, segment_ids) of (prompt, chosen, rejected)."""
  prompts = [p.prompt for p in pairs]
  rows = {}
  for side in SIDES:
    side_rows = text_rows(prompts, [getattr(p, side) for p in pairs], tokenizer, seq_len)
    rows.update({f"{side}_{k}": v for k, v in side_rows.items()})
  return rows


def preference_split(cfg, split: str) -> str:
  """The preference data's split for the loop's train / eval split names."""
  return "train" if split == cfg.data.train_split else "validation"


def preference_rows(cfg, tokenizer, split: str) -> dict[str, np.ndarray]:
  pairs = preference_pairs(cfg.align.preferences, preference_split(cfg, split),
                           cfg.data.shuffle_seed)
  return pair_rows(pairs, tokenizer, cfg.data.seq_len)
