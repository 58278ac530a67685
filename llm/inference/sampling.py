"""Token sampling as pure functions: temperature, top-k and top-p compose in one pass."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from llm.config import ConfigError

_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters.

  `suppress_ids` are never emitted (a decoder LM's pad, `<mask>` and sentinels: ids it
  was never trained to predict; see `untrained_ids`).
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 32
  eos_id: Optional[int] = None
  suppress_ids: tuple[int, ...] = ()

  def __post_init__(self):
    # A tuple of ints, so the config stays hashable (it is a static jit argument).
    object.__setattr__(self, "suppress_ids", tuple(sorted({int(i) for i in self.suppress_ids})))
    if self.max_new_tokens <= 0:
      raise ConfigError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
    if not 0 <= self.temperature < float("inf"):  # nan too
      raise ConfigError(f"temperature={self.temperature}: must be a finite number >= 0 "
                        "(0 = greedy)")
    if self.top_k < 0:
      raise ConfigError(f"top_k={self.top_k}: must be >= 0 (0 = no top-k filter)")
    if not 0.0 < self.top_p <= 1.0:
      raise ConfigError(f"top_p={self.top_p}: must be in (0, 1] (1 = no nucleus filter)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def argmax(x_BV: jax.Array) -> jax.Array:
  """jnp.argmax(x_BV, axis=-1) (first index of the max, of the first NaN in a row with one)
  as two vectorised reductions. XLA:CPU runs argmax as one (value, index) reduction it does
  not vectorise: over 4096 logits 13 us for one row and 49 us for five, against 2.3 and
  11 us this way; a greedy step, a speculative round's drafts and verify all take one."""
  max_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
  hit_BV = (x_BV == max_B1) | jnp.isnan(x_BV)
  ids_V = jnp.arange(x_BV.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(hit_BV, ids_V, x_BV.shape[-1] - 1), axis=-1)


# XLA:CPU sorts a whole row for lax.top_k (k > 16 or so) and jnp.sort: over 32k logits
# 5.2 ms (top-k 40) and 6.4 ms (top-p) per row, several decode steps of a small model.
# The filters only need one threshold per row, found here by bisection over the values'
# int32 keys (32 passes of a compare and a sum): 0.25 and 0.2 ms, the same kept sets.
# (benchmarks/sampling_speed.py)


def _ordered_keys(x_BV: jax.Array) -> jax.Array:
  """int32 keys in the order of the float32 values: bits as they are for x >= +0, the
  magnitude bits flipped below (a more negative float has larger magnitude bits)."""
  bits_BV = jax.lax.bitcast_convert_type(x_BV.astype(jnp.float32), jnp.int32)
  return jnp.where(bits_BV < 0, bits_BV ^ jnp.int32(0x7FFFFFFF), bits_BV)


def _smallest_key(keys_BV: jax.Array, holds) -> jax.Array:
  """Per row, the smallest key t in [min, max] where holds(t_B1) (false, then true as t
  grows; true at the max), by bisection: 32 halvings cover any int32 range."""
  def halve(_, bounds):
    lo_B, hi_B = bounds
    mid_B = (lo_B >> 1) + (hi_B >> 1) + (lo_B & hi_B & 1)  # floor((lo + hi) / 2), no overflow
    ok_B = holds(mid_B[:, None])
    return jnp.where(ok_B, lo_B, mid_B + 1), jnp.where(ok_B, mid_B, hi_B)
  bounds = (jnp.min(keys_BV, axis=-1), jnp.max(keys_BV, axis=-1))
  return jax.lax.fori_loop(0, 32, halve, bounds)[1][:, None]


def top_k_filter(logits_BV: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits per row (ties at the k-th value are kept too)."""
  if k <= 0 or k >= logits_BV.shape[-1]:
    return logits_BV
  keys_BV = _ordered_keys(logits_BV)
  # The k-th largest key is the smallest t with fewer than k keys above it.
  kth_B1 = _smallest_key(keys_BV, lambda t_B1: jnp.sum(keys_BV > t_B1, axis=-1) < k)
  return jnp.where(keys_BV >= kth_B1, logits_BV, _NEG_INF)


def top_p_filter(logits_BV: jax.Array, p: float) -> jax.Array:
  """Keeps the smallest set of most likely tokens whose probability reaches p."""
  if p >= 1.0:
    return logits_BV
  keys_BV = _ordered_keys(logits_BV)
  probs_BV = jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1)
  # A token is in the nucleus if the mass of strictly more likely tokens is below p:
  # those at or above the smallest t whose mass above is below p.
  mass_above = lambda t_B1: jnp.sum(jnp.where(keys_BV > t_B1, probs_BV, 0.0), axis=-1)
  cutoff_B1 = _smallest_key(keys_BV, lambda t_B1: mass_above(t_B1) < p)
  return jnp.where(keys_BV >= cutoff_B1, logits_BV, _NEG_INF)


def draw(rng: jax.Array, weights_BV: jax.Array) -> jax.Array:
  """A token per row with probability proportional to weights_BV (>= 0, some > 0 per row),
  by inverse CDF: one uniform per row, where jax.random.categorical draws a Gumbel per
  logit (0.18 vs 0.81 ms over 32k logits). A token of weight 0 is never drawn."""
  cdf_BV = jnp.cumsum(weights_BV.astype(jnp.float32), axis=-1)
  u_B1 = jax.random.uniform(rng, (weights_BV.shape[0], 1)) * cdf_BV[:, -1:]
  token_B = jnp.minimum(jnp.sum(cdf_BV <= u_B1, axis=-1), weights_BV.shape[-1] - 1)
  # Float rounding (u at the total, a cumsum not exactly monotone) could still pick a
  # token of weight 0: the likeliest one is taken instead.
  hit_B = jnp.take_along_axis(weights_BV, token_B[:, None], axis=-1)[:, 0] > 0
  return jnp.where(hit_B, token_B, argmax(weights_BV)).astype(jnp.int32)


def untrained_ids(tokenizer) -> tuple[int, ...]:
  """Ids a causal LM never sees as a target: padding, `<mask>` and the span sentinels."""
  ids = [tokenizer.pad_id, tokenizer.mask_id, *tokenizer.sentinel_ids]
  return tuple(sorted({i for i in ids if i is not None and i >= 0}))


def suppress(logits_BV: jax.Array, ids: Sequence[int]) -> jax.Array:
  if not ids:
    return logits_BV
  return logits_BV.at[:, jnp.asarray(ids, jnp.int32)].set(_NEG_INF)


def greedy_tokens(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """The argmax of each row (suppressed ids never win)."""
  return argmax(suppress(logits_BV.astype(jnp.float32), cfg.suppress_ids))


def sampling_logits(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Logits of the distribution `sample` draws from (suppressed, tempered, filtered);
  greedy: a point mass on the argmax (so speculative decoding treats both alike)."""
  logits_BV = suppress(logits_BV.astype(jnp.float32), cfg.suppress_ids)
  if cfg.greedy:
    best_B = argmax(logits_BV)
    return jnp.where(jnp.arange(logits_BV.shape[-1]) == best_B[:, None], 0.0, _NEG_INF)
  logits_BV = logits_BV / cfg.temperature
  return top_p_filter(top_k_filter(logits_BV, cfg.top_k), cfg.top_p)


def token_logprobs(logits_BV: jax.Array, token_B: jax.Array) -> jax.Array:
  """log p_model(token): the model's own distribution, before temperature and filters
  (what scoring and a PPO policy ratio need)."""
  logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]


def sample(rng: jax.Array, logits_BV: jax.Array, cfg: SamplingConfig):
  """(token_B, logprob_B): next tokens from last-position logits (B, V) and their
  log-probabilities under the model (`token_logprobs`)."""
  if cfg.greedy:
    token_B = greedy_tokens(logits_BV, cfg)
  else:
    token_B = draw(rng, jax.nn.softmax(sampling_logits(logits_BV, cfg), axis=-1))
  return token_B, token_logprobs(logits_BV, token_B)
