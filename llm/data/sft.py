"""Supervised fine-tuning rows: (prompt, completion) pairs -> fixed-shape numpy rows.

One example per row, right-padded with the tokenizer's pad id (segment id 0). The
loss is on the completion only:

  decoder          [bos] prompt completion [eos], shifted by one into inputs/targets;
                   weights 1.0 on the completion's targets and the final eos.
  encoder_decoder  encoder: prompt [eos]; decoder inputs: [start] completion,
                   targets: completion [eos], weights 1.0 on every target.
  encoder          [bos] prompt [eos] (CLS / SEP) and the completion's index in `labels`.

An example too long for `seq_len` loses prompt tokens from the left, so the
completion (and the end of the prompt, next to it) survives; the count of such
examples is returned. A completion that alone does not fit is an error.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from llm.config import ConfigError

FAMILIES = ("decoder", "encoder_decoder", "encoder")
_TOKEN_KEYS = ("inputs", "targets", "encoder_inputs")
_DECODER_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def generation_prompt(prompt: Sequence[int], tokenizer, family: str) -> list[int]:
  """The tokens generation starts from, as `sft_rows` frames a prompt: [bos] prompt for
  a decoder, prompt [eos] as an encoder-decoder's encoder input."""
  if family == "encoder_decoder":
    return [*prompt, tokenizer.eos_id]
  return [tokenizer.bos_id, *prompt]


def _check_completion(completion_len: int, seq_len: int, index: int):
  """`completion_len` counts what the completion needs even with no prompt (its eos)."""
  if completion_len > seq_len:
    raise ConfigError(
        f"example {index}: its completion takes {completion_len} tokens with eos, more than "
        f"data.seq_len={seq_len}; raise config.data.seq_len or shorten completions")


def _keep_right(prompt: list[int], room: int) -> tuple[list[int], bool]:
  """The last `room` prompt tokens, and whether any were cut."""
  if len(prompt) <= room:
    return prompt, False
  return (prompt[len(prompt) - room:] if room > 0 else []), True


def _empty_rows(keys: Sequence[str], num_rows: int, seq_len: int, pad_id: int) -> dict:
  """All-padding rows: token arrays filled with pad_id, the rest with 0."""
  return {k: np.full((num_rows, seq_len), pad_id if k in _TOKEN_KEYS else 0,
                     np.float32 if k == "weights" else np.int32) for k in keys}


def _decoder_rows(prompts, completions, tokenizer, seq_len):
  out = _empty_rows(_DECODER_KEYS, len(prompts), seq_len, tokenizer.pad_id)
  truncated = 0
  for row, (prompt, completion) in enumerate(zip(prompts, completions)):
    # bos + prompt + completion + eos is one longer than the rows it fills.
    _check_completion(len(completion) + 1, seq_len, row)
    prompt, cut = _keep_right(prompt, seq_len - len(completion) - 1)
    truncated += cut
    tokens = [*generation_prompt(prompt, tokenizer, "decoder"), *completion, tokenizer.eos_id]
    length = len(tokens) - 1
    out["inputs"][row, :length] = tokens[:-1]
    out["targets"][row, :length] = tokens[1:]
    out["weights"][row, len(prompt):length] = 1.0  # targets from the first completion token
    out["segment_ids"][row, :length] = 1
    out["positions"][row, :length] = np.arange(length)
  return out, truncated


def _encoder_decoder_rows(prompts, completions, tokenizer, seq_len, start_id):
  out = _empty_rows(("encoder_inputs", "encoder_segment_ids", *_DECODER_KEYS), len(prompts),
                    seq_len, tokenizer.pad_id)
  truncated = 0
  for row, (prompt, completion) in enumerate(zip(prompts, completions)):
    _check_completion(len(completion) + 1, seq_len, row)
    prompt, cut = _keep_right(prompt, seq_len - 1)
    truncated += cut
    encoder = generation_prompt(prompt, tokenizer, "encoder_decoder")
    out["encoder_inputs"][row, :len(encoder)] = encoder
    out["encoder_segment_ids"][row, :len(encoder)] = 1
    length = len(completion) + 1
    out["inputs"][row, :length] = [start_id, *completion]
    out["targets"][row, :length] = [*completion, tokenizer.eos_id]
    out["weights"][row, :length] = 1.0
    out["segment_ids"][row, :length] = 1
    out["positions"][row, :length] = np.arange(length)
  return out, truncated


def _encoder_rows(prompts, completions, tokenizer, seq_len, labels):
  if not labels:
    raise ConfigError("sft_rows for family='encoder' needs labels=[...] (the label words the "
                      "completions are drawn from)")
  if seq_len < 3:
    raise ConfigError(f"data.seq_len={seq_len}: classification rows need >= 3 ([CLS] id [SEP])")
  index = {label.strip(): i for i, label in enumerate(labels)}
  out = _empty_rows(("inputs", "segment_ids", "positions"), len(prompts), seq_len,
                    tokenizer.pad_id)
  out["labels"] = np.zeros((len(prompts),), np.int32)
  truncated = 0
  for row, (prompt, completion) in enumerate(zip(prompts, completions)):
    if completion.strip() not in index:
      raise ConfigError(f"example {row}: completion {completion!r} is not one of the labels "
                        f"{list(labels)}; fix the template or the label set")
    prompt, cut = _keep_right(prompt, seq_len - 2)
    truncated += cut
    tokens = [tokenizer.bos_id, *prompt, tokenizer.eos_id]
    out["inputs"][row, :len(tokens)] = tokens
    out["segment_ids"][row, :len(tokens)] = 1
    out["positions"][row, :len(tokens)] = np.arange(len(tokens))
    out["labels"][row] = index[completion.strip()]
  return out, truncated


def sft_rows(pairs: Sequence[tuple[str, str]], tokenizer, seq_len: int, family: str, *,
             start_id: Optional[int] = None,
             labels: Sequence[str] = ()) -> tuple[dict[str, np.ndarray], int]:
  """(rows, num_truncated): each (prompt, completion) pair as one right-padded row.

  Prompt and completion are tokenized apart, so the loss boundary is exact and
  matches what generation and label scoring see. `start_id` is the encoder-decoder's
  decoder start token (default the pad id, as T5); `labels` are the encoder's classes.
  """
  if family not in FAMILIES:
    raise ConfigError(f"model.family={family!r}: sft rows exist for {', '.join(FAMILIES)}")
  if seq_len < 2:
    raise ConfigError(f"data.seq_len={seq_len}: must be >= 2")
  if not pairs:
    raise ConfigError("sft_rows: no (prompt, completion) pairs; check the task's split")
  prompt_texts, completion_texts = zip(*pairs)
  prompts = tokenizer.encode_batch(prompt_texts)
  if family == "encoder":
    return _encoder_rows(prompts, completion_texts, tokenizer, seq_len, labels)
  completions = tokenizer.encode_batch(completion_texts)
  if family == "decoder":
    return _decoder_rows(prompts, completions, tokenizer, seq_len)
  start = tokenizer.pad_id if start_id is None else start_id
  return _encoder_decoder_rows(prompts, completions, tokenizer, seq_len, start)
