"""The one matmul every layer uses, so LoRA and quantization reach all of them.

`dot` is the only place a param kernel meets an activation: `Linear`, the experts'
`ExpertLinear` and the tied output embedding (`Embed.attend`) all call it. A quantized
kernel (`llm.layers.quant.QArray`: any object with `quantized_dot` and `quantized_take`) plugs in
here without the models knowing; LoRA wraps the three modules by interception
(`llm.peft.lora`).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.layers.common import dtype_of


def logical_init(init, names: Sequence[str | None]):
  """Wraps an initializer so the param carries logical axis names for sharding."""
  return nn.with_logical_partitioning(init, tuple(names))


def kernel_param(module: nn.Module, name: str, init, shape, dtype):
  """module.param(name, init, shape, dtype), or the quantized kernel stored under `name`.

  A QArray's values are laid out for its dot, not in the float shape that Flax checks a
  param's first leaf against, so its (float) `shape` is checked here instead."""
  if module.has_variable("params", name):
    value = module.get_variable("params", name)
    if hasattr(value, "quantized_dot"):
      if tuple(value.shape) != tuple(shape):
        raise ValueError(f"the quantized param {name!r} of {module.name} has shape "
                         f"{tuple(value.shape)}, the model expects {tuple(shape)}; quantize "
                         "a checkpoint of this model config")
      return value
  return module.param(name, init, shape, dtype)


def dot(x: jax.Array, kernel, dimension_numbers, dtype) -> jax.Array:
  """lax.dot_general(x, kernel) in the compute `dtype`, for float or quantized kernels."""
  dtype = dtype_of(dtype)
  if hasattr(kernel, "quantized_dot"):  # a quantized kernel dequantizes inside its own dot
    return kernel.quantized_dot(x.astype(dtype), dimension_numbers, dtype)
  return jax.lax.dot_general(x.astype(dtype), jnp.asarray(kernel, dtype), dimension_numbers)


def take_rows(table, ids: jax.Array, dtype) -> jax.Array:
  """Rows `ids` of an embedding table (float or quantized), in the compute `dtype`."""
  if hasattr(table, "quantized_take"):
    return table.quantized_take(ids, dtype_of(dtype))
  return jnp.take(table, ids, axis=0).astype(dtype_of(dtype))


def contract_last(x_ndim: int, in_dims: int):
  """dimension_numbers contracting the last `in_dims` axes of x with a kernel's first."""
  return ((tuple(range(x_ndim - in_dims, x_ndim)), tuple(range(in_dims))), ((), ()))


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
    kernel = kernel_param(
        self, "kernel",
        logical_init(nn.initializers.normal(self.init_std), self.axes),
        (*in_shape, *self.features), dtype_of(self.param_dtype))
    y = dot(x, kernel, contract_last(x.ndim, self.in_dims), self.dtype)
    if self.use_bias:
      bias = self.param("bias", logical_init(nn.initializers.zeros, self.axes[self.in_dims:]),
                        self.features, dtype_of(self.param_dtype))
      y = y + jnp.asarray(bias, dtype_of(self.dtype))
    return y
