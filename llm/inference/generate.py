"""Autoregressive generation with a KV cache, inside one jitted loop.

Prompts of different lengths are left-padded so that every row's next token lands in
the same cache slot; padding is marked invalid in the cache and positions count real
tokens only, so a padded row computes exactly what it would alone.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm.config import ConfigError
from llm.inference.sampling import SamplingConfig, sample
from llm.models.blocks import unscanned


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
  """(tokens_BP, valid_BP) with each prompt right-aligned in a (B, P) array."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ConfigError("prompts: every prompt needs at least one token (e.g. the BOS id)")
  length = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  valid = np.zeros((len(prompts), length), bool)
  for row, prompt in enumerate(prompts):
    tokens[row, length - len(prompt):] = prompt
    valid[row, length - len(prompt):] = True
  return tokens, valid


def init_cache(module: nn.Module, batch: int, length: int):
  """Zeroed KV cache with `length` slots, shaped by tracing init (no FLOPs spent)."""
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((batch, length), jnp.int32),
                          decode=True))["cache"]
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _sample_loop(step, cache, first_logits_BV, next_pos_B, rng, sampling: SamplingConfig):
  """Samples max_new_tokens tokens; `step(cache, tokens_B1, positions_B1)` -> (logits_B1V,
  cache) runs the model on one new token per row. Stops early once every row hit EOS."""
  batch = first_logits_BV.shape[0]
  rng, first_rng = jax.random.split(rng)
  token_B = sample(first_rng, first_logits_BV, sampling)
  eos = -1 if sampling.eos_id is None else sampling.eos_id
  out_BN = jnp.zeros((batch, sampling.max_new_tokens), jnp.int32).at[:, 0].set(token_B)

  def cond(carry):
    i, _, _, _, _, done_B, _ = carry
    return (i < sampling.max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, cache, token_B, pos_B, out_BN, done_B, rng = carry
    logits_B1V, cache = step(cache, token_B[:, None], pos_B[:, None])
    rng, step_rng = jax.random.split(rng)
    new_B = sample(step_rng, logits_B1V[:, 0], sampling)
    new_B = jnp.where(done_B, 0, new_B)  # finished rows emit padding
    out_BN = out_BN.at[:, i].set(new_B)
    return (i + 1, cache, new_B, pos_B + 1, out_BN, done_B | (new_B == eos), rng)

  carry = (jnp.int32(1), cache, token_B, next_pos_B, out_BN, token_B == eos, rng)
  return jax.lax.while_loop(cond, body, carry)[4]


@functools.partial(jax.jit, static_argnames=("module", "sampling", "cache_len"))
def _generate(module, params, tokens_BP, valid_BP, rng, sampling: SamplingConfig,
              cache_len: int):
  batch = tokens_BP.shape[0]
  cache = init_cache(module, batch, cache_len)
  positions_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0)
  logits_BPV, mutated = module.apply(
      {"params": params, "cache": cache}, tokens_BP, positions_BP, valid_BP.astype(jnp.int32),
      decode=True, mutable=["cache"])

  def step(cache, tokens_B1, positions_B1):
    logits_B1V, mutated = module.apply({"params": params, "cache": cache}, tokens_B1,
                                       positions_B1, jnp.ones_like(tokens_B1), decode=True,
                                       mutable=["cache"])
    return logits_B1V, mutated["cache"]
  return _sample_loop(step, mutated["cache"], logits_BPV[:, -1], positions_BP[:, -1] + 1, rng,
                      sampling)


@functools.partial(jax.jit, static_argnames=("module", "sampling", "cache_len"))
def _generate_seq2seq(module, params, encoder_BS, encoder_valid_BS, rng,
                      sampling: SamplingConfig, cache_len: int, start_id: int):
  batch = encoder_BS.shape[0]
  segments_BS = encoder_valid_BS.astype(jnp.int32)
  shapes = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), encoder_BS, jnp.zeros((batch, cache_len), jnp.int32), segments_BS,
      decode=True))["cache"]
  cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  encoded_BSD = module.apply({"params": params}, encoder_BS, segments_BS,
                             method=module.encode)  # the encoder runs once

  def step(cache, tokens_B1, positions_B1, encoded=None):
    logits_B1V, mutated = module.apply(
        {"params": params, "cache": cache}, tokens_B1, encoded, segments_BS, positions_B1,
        jnp.ones_like(tokens_B1), True, method=module.decode, mutable=["cache"])
    return logits_B1V, mutated["cache"]

  start_B1 = jnp.full((batch, 1), start_id, jnp.int32)
  # The first step also projects the encoder output into every layer's cross-attention cache.
  logits_B1V, cache = step(cache, start_B1, jnp.zeros((batch, 1), jnp.int32), encoded_BSD)
  return _sample_loop(step, cache, logits_B1V[:, 0], jnp.ones((batch,), jnp.int32), rng,
                      sampling)


def generate_seq2seq(module: nn.Module, params, encoder_prompts: Sequence[Sequence[int]],
                     sampling: SamplingConfig, rng: jax.Array, pad_id: int = 0,
                     start_id: int = 0) -> list[list[int]]:
  """Decoder tokens for each encoder input (T5 / BART): the encoder runs once, the
  decoder starts from `start_id` (T5: pad) and decodes with a KV cache."""
  length = max(len(p) for p in encoder_prompts)
  encoder_BS = np.full((len(encoder_prompts), length), pad_id, np.int32)
  valid_BS = np.zeros_like(encoder_BS, bool)
  for row, prompt in enumerate(encoder_prompts):
    encoder_BS[row, :len(prompt)], valid_BS[row, :len(prompt)] = prompt, True
  cfg = module.cfg
  if cfg.positions == "learned" and max(length, sampling.max_new_tokens + 1) > cfg.max_len:
    raise ConfigError(f"input of {length} tokens or max_new_tokens={sampling.max_new_tokens} "
                      f"exceeds model.max_len={cfg.max_len}; shorten it")
  module, params = unscanned(module, params)
  out_BN = np.asarray(_generate_seq2seq(module, params, jnp.asarray(encoder_BS),
                                        jnp.asarray(valid_BS), rng, sampling,
                                        sampling.max_new_tokens + 1, start_id))
  return _cut_at_eos(out_BN, sampling)


def _cut_at_eos(out_BN, sampling) -> list[list[int]]:
  results = []
  for row in out_BN.tolist():
    if sampling.eos_id is not None and sampling.eos_id in row:
      row = row[:row.index(sampling.eos_id) + 1]
    results.append(row)
  return results


def generate(module: nn.Module, params, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig, rng: jax.Array, pad_id: int = 0) -> list[list[int]]:
  """New tokens for each prompt: at most `max_new_tokens`, ending at (and including) EOS."""
  tokens_BP, valid_BP = left_pad(prompts, pad_id)
  context = module.cfg.max_len
  cache_len = tokens_BP.shape[1] + sampling.max_new_tokens
  if cache_len > context:
    raise ConfigError(
        f"prompt of {tokens_BP.shape[1]} tokens + max_new_tokens={sampling.max_new_tokens} "
        f"exceeds the context window of {context} (model.max_len); shorten the prompt or "
        "lower max_new_tokens")
  module, params = unscanned(module, params)
  out_BN = np.asarray(_generate(module, params, jnp.asarray(tokens_BP), jnp.asarray(valid_BP),
                                rng, sampling, cache_len))
  return _cut_at_eos(out_BN, sampling)
