"""Token sampling as pure functions: temperature, top-k and top-p compose in one pass."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from llm.config import ConfigError

_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 32
  eos_id: Optional[int] = None

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ConfigError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
    if self.temperature < 0:
      raise ConfigError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
    if self.top_k < 0:
      raise ConfigError(f"top_k={self.top_k}: must be >= 0 (0 = no top-k filter)")
    if not 0.0 < self.top_p <= 1.0:
      raise ConfigError(f"top_p={self.top_p}: must be in (0, 1] (1 = no nucleus filter)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def top_k_filter(logits_BV: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits per row (ties at the k-th value are kept too)."""
  if k <= 0 or k >= logits_BV.shape[-1]:
    return logits_BV
  kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
  return jnp.where(logits_BV >= kth_B1, logits_BV, _NEG_INF)


def top_p_filter(logits_BV: jax.Array, p: float) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose probability reaches p."""
  if p >= 1.0:
    return logits_BV
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  # A token is in the nucleus if the mass of strictly more likely tokens is below p.
  in_nucleus_BV = mass_before_BV < p
  cutoff_B1 = jnp.min(jnp.where(in_nucleus_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV >= cutoff_B1, logits_BV, _NEG_INF)


def sample(rng: jax.Array, logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Next tokens (B,) from last-position logits (B, V)."""
  logits_BV = logits_BV.astype(jnp.float32)
  if cfg.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / cfg.temperature
  logits_BV = top_p_filter(top_k_filter(logits_BV, cfg.top_k), cfg.top_p)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)
