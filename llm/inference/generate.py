"""Autoregressive sampling (greedy, temperature, top-k, top-p) over the decode state.

Prompts are right-padded: row b's tokens sit at cache slots 0 .. len_b - 1 and the
state's per-row end index says where each row continues, so a padded row computes
exactly what it would alone. The whole loop is one jitted `while_loop`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm.config import ConfigError
from llm.inference.decode import DecodeState, decode_layout, decode_step, prefill
from llm.inference.sampling import SamplingConfig, sample


@dataclasses.dataclass(frozen=True)
class Generation:
  """New tokens per row (host arrays). Beam search adds a beam axis, best beam first.

  tokens: (..., N) int32, 0 past each row's length.
  logprobs: (..., N) float32 log p_model of each token (0 past the length).
  lengths: (...,) tokens per row, EOS included.
  scores: beam search only, the length-penalised score of each beam.
  """

  tokens: np.ndarray
  logprobs: np.ndarray
  lengths: np.ndarray
  scores: Optional[np.ndarray] = None

  def lists(self) -> list[list[int]]:
    """Each row's tokens, cut at its length (beam search: the best beam's)."""
    tokens, lengths = self.tokens, self.lengths
    if tokens.ndim == 3:
      tokens, lengths = tokens[:, 0], lengths[:, 0]
    return [row[:n].tolist() for row, n in zip(tokens, lengths)]


def right_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
  """(tokens_BP, lengths_B) with each prompt left-aligned in a (B, P) array."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ConfigError("prompts: every prompt needs at least one token (e.g. the BOS id)")
  tokens = np.full((len(prompts), max(len(p) for p in prompts)), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
  return tokens, np.array([len(p) for p in prompts], np.int32)


def prompt_inputs(cfg, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int = 0,
                  start_id: int = 0) -> tuple[dict, int]:
  """(prefill keyword arrays, cache slots needed) for `max_new_tokens` after `prompts`.

  A decoder continues each prompt; an encoder-decoder encodes it and decodes from
  `start_id` (T5: pad). Refuses encoders and inputs beyond the context window.
  """
  if cfg.family == "encoder":
    raise ConfigError("model.family=encoder: encoder-only models (BERT, RoBERTa) do not "
                      "generate; use a decoder or encoder_decoder workdir")
  tokens_BP, lengths_B = right_pad(prompts, pad_id)
  if cfg.family == "encoder_decoder":
    if cfg.positions == "learned" and max(tokens_BP.shape[1], max_new_tokens + 1) > cfg.max_len:
      raise ConfigError(f"input of {tokens_BP.shape[1]} tokens or max_new_tokens="
                        f"{max_new_tokens} exceeds model.max_len={cfg.max_len}; shorten it")
    batch = tokens_BP.shape[0]
    segments_BS = (np.arange(tokens_BP.shape[1])[None] < lengths_B[:, None]).astype(np.int32)
    return dict(tokens_BT=np.full((batch, 1), start_id, np.int32),
                lengths_B=np.ones((batch,), np.int32), encoder_BS=tokens_BP,
                encoder_segment_ids_BS=segments_BS), 1 + max_new_tokens
  return dict(tokens_BT=tokens_BP, lengths_B=lengths_B), context_slots(
      cfg, tokens_BP.shape[1], max_new_tokens)


def context_slots(cfg, prompt_len: int, max_new_tokens: int) -> int:
  """Cache slots for a decoder prompt and its continuation, within the context window."""
  if prompt_len + max_new_tokens > cfg.max_len:
    raise ConfigError(
        f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds the "
        f"context window of {cfg.max_len} (model.max_len); shorten the prompt or lower "
        "max_new_tokens")
  return prompt_len + max_new_tokens


def lengths_at_eos(tokens_BN: np.ndarray, eos_id: Optional[int]) -> np.ndarray:
  """Tokens per row up to and including its first EOS (all of them without one)."""
  n = tokens_BN.shape[-1]
  if eos_id is None:
    return np.full(tokens_BN.shape[:-1], n, np.int32)
  is_eos = tokens_BN == eos_id
  return np.where(is_eos.any(-1), is_eos.argmax(-1) + 1, n).astype(np.int32)


def to_generation(tokens_BN, logprobs_BN, eos_id: Optional[int], scores=None) -> Generation:
  tokens_BN, logprobs_BN = np.asarray(tokens_BN), np.asarray(logprobs_BN)
  lengths = lengths_at_eos(tokens_BN, eos_id)
  past_end = np.arange(tokens_BN.shape[-1]) >= lengths[..., None]
  return Generation(np.where(past_end, 0, tokens_BN).astype(np.int32),
                    np.where(past_end, 0.0, logprobs_BN).astype(np.float32), lengths,
                    None if scores is None else np.asarray(scores))


def sample_loop(module: nn.Module, params, state: DecodeState, rng: jax.Array,
                sampling: SamplingConfig):
  """(tokens_BN, logprobs_BN): max_new_tokens tokens sampled after `state`, one
  decode step each; stops early once every row has emitted EOS."""
  batch, n = state.end_B.shape[0], sampling.max_new_tokens
  eos = -1 if sampling.eos_id is None else sampling.eos_id
  rng, first_rng = jax.random.split(rng)
  token_B, logp_B = sample(first_rng, state.logits_BV, sampling)
  tokens_BN = jnp.zeros((batch, n), jnp.int32).at[:, 0].set(token_B)
  logps_BN = jnp.zeros((batch, n), jnp.float32).at[:, 0].set(logp_B)

  def cond(carry):
    i, *_, done_B, _ = carry
    return (i < n) & ~jnp.all(done_B)

  def body(carry):
    i, state, token_B, tokens_BN, logps_BN, done_B, rng = carry
    _, state = decode_step(module, params, state, token_B[:, None])
    rng, step_rng = jax.random.split(rng)
    new_B, logp_B = sample(step_rng, state.logits_BV, sampling)
    new_B = jnp.where(done_B, 0, new_B)  # finished rows emit padding
    tokens_BN = tokens_BN.at[:, i].set(new_B)
    logps_BN = logps_BN.at[:, i].set(jnp.where(done_B, 0.0, logp_B))
    return (i + 1, state, new_B, tokens_BN, logps_BN, done_B | (new_B == eos), rng)

  carry = (jnp.int32(1), state, token_B, tokens_BN, logps_BN, token_B == eos, rng)
  return jax.lax.while_loop(cond, body, carry)[3:5]


@functools.partial(jax.jit, static_argnames=("module", "sampling", "cache_len"))
def _sample_sequences(module, params, inputs: dict, rng, sampling: SamplingConfig,
                      cache_len: int):
  state = prefill(module, params, cache_len=cache_len, **inputs)
  return sample_loop(module, params, state, rng, sampling)


def generate_sequences(module: nn.Module, params, prompts: Sequence[Sequence[int]],
                       sampling: SamplingConfig, rng: jax.Array, pad_id: int = 0,
                       start_id: int = 0) -> Generation:
  """At most `max_new_tokens` new tokens per prompt (ending at EOS), their log-probs and
  lengths. Decoders continue the prompt; encoder-decoders decode from `start_id`."""
  inputs, cache_len = prompt_inputs(module.cfg, prompts, sampling.max_new_tokens, pad_id,
                                    start_id)
  module, params = decode_layout(module, params, len(prompts))
  tokens_BN, logps_BN = _sample_sequences(module, params, inputs, rng, sampling, cache_len)
  return to_generation(tokens_BN, logps_BN, sampling.eos_id)


def generate(module: nn.Module, params, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig, rng: jax.Array, pad_id: int = 0) -> list[list[int]]:
  """New tokens for each prompt: at most `max_new_tokens`, ending at (and including) EOS."""
  return generate_sequences(module, params, prompts, sampling, rng, pad_id).lists()


def generate_seq2seq(module: nn.Module, params, encoder_prompts: Sequence[Sequence[int]],
                     sampling: SamplingConfig, rng: jax.Array, pad_id: int = 0,
                     start_id: int = 0) -> list[list[int]]:
  """Decoder tokens for each encoder input (T5 / BART), from `start_id` (T5: pad)."""
  return generate_sequences(module, params, encoder_prompts, sampling, rng, pad_id,
                            start_id).lists()
