"""The one projection every layer uses, so LoRA and quantization reach all of them."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.layers.common import dtype_of


def logical_init(init, names: Sequence[str | None]):
  """Wraps an initializer so the param carries logical axis names for sharding."""
  return nn.with_logical_partitioning(init, tuple(names))


class Linear(nn.Module):
  """y = x W + b, contracting the last `in_dims` axes of x into `features`.

  `axes` names every kernel dimension (contracted dims first, then output dims), e.g.
  ("embed", "heads", "head_dim") for a query projection D -> N x H.
  """

  features: tuple[int, ...]
  axes: tuple[str | None, ...]
  in_dims: int = 1
  use_bias: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[-self.in_dims:]
    kernel = self.param(
        "kernel",
        logical_init(nn.initializers.normal(self.init_std), self.axes),
        (*in_shape, *self.features), dtype_of(self.param_dtype))
    dtype = dtype_of(self.dtype)
    contract = tuple(range(x.ndim - self.in_dims, x.ndim))
    y = jax.lax.dot_general(
        x.astype(dtype), jnp.asarray(kernel, dtype),
        ((contract, tuple(range(self.in_dims))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", logical_init(nn.initializers.zeros, self.axes[self.in_dims:]),
                        self.features, dtype_of(self.param_dtype))
      y = y + jnp.asarray(bias, dtype)
    return y
