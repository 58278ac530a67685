"""Prefix caching: a prompt prefix shared by many requests (a system prompt, few-shot
examples) is read once; each batch of requests starts from copies of its cache.

The cache is fingerprinted with the model that built it (config, param shapes and a
sample of the weights), so a cache from another model or checkpoint is refused rather
than silently decoded against.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm.config import ConfigError
from llm.inference.decode import (DecodeState, decode_step, for_decoding, gather_rows, prefill,
                                  with_cache_len)
from llm.inference.generate import (Generation, context_slots, right_pad, sample_loop,
                                    to_generation)
from llm.inference.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class PrefixCache:
  """The decode state (one row, exactly `length` slots) after a prefix."""

  state: DecodeState
  length: int
  fingerprint: str


@jax.jit
def _weight_sample(params):
  return [x.ravel()[:16] for x in jax.tree_util.tree_leaves(params)]


def model_fingerprint(module: nn.Module, params) -> str:
  digest = hashlib.sha256(repr(module.cfg).encode())
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
  for values in _weight_sample(params):
    digest.update(np.asarray(values).tobytes())
  return digest.hexdigest()[:16]


_prefill = jax.jit(prefill, static_argnames=("module", "cache_len"))


def build_prefix_cache(module: nn.Module, params, prefix: Sequence[int]) -> PrefixCache:
  if module.cfg.family != "decoder":
    raise ConfigError(f"model.family={module.cfg.family}: prefix caching is for decoder "
                      "models (the prefix is part of the prompt)")
  module, params = for_decoding(module, params)
  tokens_1P, lengths_1 = right_pad([prefix])
  state = _prefill(module, params, tokens_1P, lengths_1, cache_len=len(prefix))
  return PrefixCache(state, len(prefix), model_fingerprint(module, params))


def _check(module, params, prefix: PrefixCache) -> None:
  if model_fingerprint(module, params) != prefix.fingerprint:
    raise ConfigError("prefix cache was built by another model or checkpoint; rebuild it "
                      "with build_prefix_cache for this one")


def extend_prefix(module: nn.Module, params, prefix: DecodeState, suffix_BS, lengths_B,
                  cache_len: int) -> DecodeState:
  """Copies of the one-row prefix state, one per suffix, each suffix appended."""
  state = gather_rows(prefix, jnp.zeros((suffix_BS.shape[0],), jnp.int32))
  state = with_cache_len(state, cache_len)
  return decode_step(module, params, state, suffix_BS, lengths_B)[1]


@functools.partial(jax.jit, static_argnames=("module", "sampling", "cache_len"))
def _generate(module, params, prefix, suffix_BS, lengths_B, rng, sampling, cache_len):
  state = extend_prefix(module, params, prefix, suffix_BS, lengths_B, cache_len)
  return sample_loop(module, params, state, rng, sampling)


def generate_with_prefix(module: nn.Module, params, prefix: PrefixCache,
                         suffixes: Sequence[Sequence[int]], sampling: SamplingConfig,
                         rng: jax.Array, pad_id: int = 0) -> Generation:
  """`generate_sequences` for prompts prefix + suffix (each suffix >= 1 token), reading
  only the suffixes."""
  module, params = for_decoding(module, params)
  _check(module, params, prefix)
  suffix_BS, lengths_B = right_pad(suffixes, pad_id)
  cache_len = context_slots(module.cfg, prefix.length + suffix_BS.shape[1],
                            sampling.max_new_tokens)
  tokens, logps = _generate(module, params, prefix.state, suffix_BS, lengths_B, rng, sampling,
                            cache_len)
  return to_generation(tokens, logps, sampling.eos_id)
