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


@functools.partial(jax.jit, static_argnames=("module", "sampling", "cache_len"))
def _generate(module, params, tokens_BP, valid_BP, rng, sampling: SamplingConfig,
              cache_len: int):
  batch = tokens_BP.shape[0]
  cache = init_cache(module, batch, cache_len)
  positions_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0)
  logits_BPV, mutated = module.apply(
      {"params": params, "cache": cache}, tokens_BP, positions_BP, valid_BP.astype(jnp.int32),
      decode=True, mutable=["cache"])
  rng, first_rng = jax.random.split(rng)
  token_B = sample(first_rng, logits_BPV[:, -1], sampling)
  next_pos_B = positions_BP[:, -1] + 1
  eos = -1 if sampling.eos_id is None else sampling.eos_id
  out_BN = jnp.zeros((batch, sampling.max_new_tokens), jnp.int32).at[:, 0].set(token_B)
  done_B = token_B == eos

  def cond(carry):
    i, _, _, _, _, done_B, _ = carry
    return (i < sampling.max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, cache, token_B, pos_B, out_BN, done_B, rng = carry
    logits_B1V, mutated = module.apply(
        {"params": params, "cache": cache}, token_B[:, None], pos_B[:, None],
        jnp.ones((batch, 1), jnp.int32), decode=True, mutable=["cache"])
    rng, step_rng = jax.random.split(rng)
    new_B = sample(step_rng, logits_B1V[:, 0], sampling)
    new_B = jnp.where(done_B, 0, new_B)  # finished rows emit padding
    out_BN = out_BN.at[:, i].set(new_B)
    return (i + 1, mutated["cache"], new_B, pos_B + 1, out_BN, done_B | (new_B == eos), rng)

  carry = (jnp.int32(1), mutated["cache"], token_B, next_pos_B, out_BN, done_B, rng)
  return jax.lax.while_loop(cond, body, carry)[4]


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
  results = []
  for row in out_BN.tolist():
    if sampling.eos_id is not None and sampling.eos_id in row:
      row = row[:row.index(sampling.eos_id) + 1]
    results.append(row)
  return results
