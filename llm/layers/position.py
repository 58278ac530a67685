"""Position encodings: rotary (RoPE) as pure functions; learned tables live in the model."""

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
