"""The one matmul every layer uses, so LoRA and quantization reach all of them.

`dot` is the only place a param kernel meets an activation: `Linear`, the experts'
`ExpertLinear` and the tied output embedding (`Embed.attend`) all call it. A quantized
kernel (`llm.layers.quant.QArray`: any object with `quantized_dot` and `quantized_take`) plugs in
here without the models knowing; LoRA wraps the three modules by interception
(`llm.peft.lora`). A `RowKernel` (a decode layout of a `Linear`'s kernel and bias) is
the other kind of kernel object.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

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
    if hasattr(value, "quantized_dot") or isinstance(value, RowKernel):
      if tuple(value.shape) != tuple(shape):
        fix = "lay out" if isinstance(value, RowKernel) else "quantize"
        raise ValueError(f"the {type(value).__name__} param {name!r} of {module.name} has "
                         f"shape {tuple(value.shape)}, the model expects {tuple(shape)}; "
                         f"{fix} a checkpoint of this model config")
      return value
  return module.param(name, init, shape, dtype)


def dot(x: jax.Array, kernel, dimension_numbers, dtype) -> jax.Array:
  """lax.dot_general(x, kernel) in the compute `dtype`, for float or quantized kernels."""
  dtype = dtype_of(dtype)
  if hasattr(kernel, "quantized_dot"):  # a quantized kernel dequantizes inside its own dot
    return kernel.quantized_dot(x.astype(dtype), dimension_numbers, dtype)
  return jax.lax.dot_general(x.astype(dtype), jnp.asarray(kernel, dtype), dimension_numbers)


@struct.dataclass
class RowKernel:
  """A float kernel (in..., out...) and its bias stored for one-row dots: `rows` is
  (prod(out), prod(in) + 1), the kernel transposed with the bias (zeros without one) as
  its last column, and y = [x, 1] rows^T.

  Why: XLA:CPU computes a one-row x @ W with W (in, out) as an Eigen matrix-vector dot,
  and x @ R^T with R's rows contiguous as a fused two-thread loop that also takes in the
  layer norm before it; for d_model 384 the loop reads the weights 1.4-1.6x faster
  (benchmarks/decode_throughput.py's matvec floor). A separate bias add would fuse into a
  dot instead and make XLA copy R transposed at every step, hence the bias column.
  """

  rows: jax.Array
  shape: tuple = struct.field(pytree_node=False)  # the float kernel's
  in_dims: int = struct.field(pytree_node=False)

  @classmethod
  def of(cls, kernel: jax.Array, bias, in_dims: int) -> "RowKernel":
    inputs = math.prod(kernel.shape[:in_dims])
    bias = jnp.zeros(kernel.shape[in_dims:], kernel.dtype) if bias is None else bias
    rows = jnp.concatenate([jnp.reshape(kernel, (inputs, -1)).T,
                            jnp.reshape(bias, (-1, 1)).astype(kernel.dtype)], axis=1)
    return cls(rows, tuple(kernel.shape), in_dims)

  @property
  def dtype(self):
    return self.rows.dtype

  def kernel_and_bias(self) -> tuple[jax.Array, jax.Array]:
    """The float (kernel, bias) this was made of."""
    return (self.rows[:, :-1].T.reshape(self.shape),
            self.rows[:, -1].reshape(self.shape[self.in_dims:]))

  def biased_dot(self, x: jax.Array, dtype) -> jax.Array:
    """x W + b for x (..., in...), in the compute `dtype`."""
    dtype = dtype_of(dtype)
    x_BI = jnp.reshape(x, (*x.shape[:x.ndim - self.in_dims], -1)).astype(dtype)
    x_BI = jnp.concatenate([x_BI, jnp.ones((*x_BI.shape[:-1], 1), dtype)], axis=-1)
    y_BO = jax.lax.dot_general(x_BI, self.rows.astype(dtype), (((x_BI.ndim - 1,), (1,)),
                                                                ((), ())))
    return y_BO.reshape(*x_BI.shape[:-1], *self.shape[self.in_dims:])


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
    if isinstance(kernel, RowKernel):  # its bias inside (llm.inference.one_row_layout)
      return kernel.biased_dot(x, self.dtype)
    y = dot(x, kernel, contract_last(x.ndim, self.in_dims), self.dtype)
    if self.use_bias:
      bias = self.param("bias", logical_init(nn.initializers.zeros, self.axes[self.in_dims:]),
                        self.features, dtype_of(self.param_dtype))
      y = y + jnp.asarray(bias, dtype_of(self.dtype))
    return y
