"""Position encodings: rotary (RoPE) as pure functions; learned tables live in the model."""

import math

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
  """Inverse frequencies theta^(-2i/H) for i < H/2."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (x_i, x_{i+H/2}) by angle position * freq_i ("rotate half" layout).

  The rotate-half pairing is the one LLaMA checkpoints in Hugging Face format use, so
  their q/k projection weights load without permutation.
  """
  head_dim = x_BTNH.shape[-1]
  angles_BTF = positions_BT[..., None].astype(jnp.float32) * rope_frequencies(head_dim, theta)
  sin = jnp.sin(angles_BTF)[:, :, None, :]
  cos = jnp.cos(angles_BTF)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def alibi_slopes(num_heads: int) -> jax.Array:
  """Per-head ALiBi slopes (Press et al.; BLOOM): a geometric sequence 2^(-8i/n), with
  the in-between slopes of the next power of two interleaved when n is not one."""
  def powers(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]
  closest = 2 ** math.floor(math.log2(num_heads))
  slopes = powers(closest)
  if closest < num_heads:
    slopes += powers(2 * closest)[0::2][:num_heads - closest]
  return jnp.asarray(slopes, jnp.float32)


def alibi_bias(num_heads: int, key_positions_BS: jax.Array) -> jax.Array:
  """bias_BN1S = slope_n * key position. Softmax ignores per-query constants, so this
  equals the usual -slope * (t - s) and needs no query positions (works for packing and
  caches)."""
  slopes_1N11 = alibi_slopes(num_heads)[None, :, None, None]
  return slopes_1N11 * key_positions_BS[:, None, None, :].astype(jnp.float32)


def relative_position_bucket(relative_TS: jax.Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """T5's buckets for relative = key_pos - query_pos: exact for small distances,
  logarithmic up to max_distance, shared beyond; directions apart if bidirectional."""
  bucket = jnp.zeros_like(relative_TS)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (relative_TS > 0).astype(relative_TS.dtype) * num_buckets
    distance = jnp.abs(relative_TS)
  else:
    distance = -jnp.minimum(relative_TS, 0)
  max_exact = num_buckets // 2
  large = max_exact + (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
                       / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(relative_TS.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(distance < max_exact, distance, large)


def relative_bias(table_KN: jax.Array, q_positions_BT: jax.Array, k_positions_BS: jax.Array,
                  bidirectional: bool, max_distance: int) -> jax.Array:
  """bias_BNTS looked up from the (buckets, heads) table of learned T5 biases."""
  relative_BTS = k_positions_BS[:, None, :] - q_positions_BT[:, :, None]
  buckets_BTS = relative_position_bucket(relative_BTS, bidirectional, table_KN.shape[0],
                                         max_distance)
  return jnp.take(table_KN, buckets_BTS, axis=0).transpose(0, 3, 1, 2).astype(jnp.float32)
