"""Weight-only int8 / int4 quantization: a quantized array and its dot and row lookup.

A `QArray` replaces a float kernel or embedding table in a param tree. `llm.layers.linear`
calls its `quantized_dot` / `quantized_take`, so every `Linear`, `ExpertLinear` and the tied
embedding use it without the models knowing.

Layout. The contracted axes of a kernel (`contract`, negative so that a leading layer
axis stacked by `nn.scan` does not move them) are adjacent; merged into one axis of size C
they split into G groups of g = C / G values, each with one float32 scale (symmetric:
w ~ scale * q, q in [-qmax, qmax]). int8 has one group (a scale per output channel);
int4 has groups of 128 (or of C when smaller). `values` holds the free axes first, in
their order, and the contracted ones last: (*free, *contracted), so that a layer axis stays
in front for `nn.scan` and each output channel's weights are contiguous (XLA:CPU's int8
dot runs up to 3x faster so than in the float layout when the output is narrow, as in an
MLP's down projection). `scale` is (*free, G, 1). `shape` is the float
array's; `llm.layers.linear.kernel_param` checks it (Flax would check the first leaf's).

The dot. XLA:CPU converts an int8 kernel to float in memory before a float dot (the
dequantised kernel is materialised: 4x the bytes read), while an int8 x int8 dot with
int32 accumulation reads the int8 kernel as is. So activations enter the dot as two int8
limbs per value, x ~ s (hi + lo / 254) with s = max|x| / 127 per row: the error is at most
max|x| / 64516, about float16's resolution at the row's largest value, and at batch 1 the
second limb is free (int8 dots with one row run a slow matrix-vector path; two rows do
not). The int32 partial sums of each group are scaled in float32 and summed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

LIMB = 254  # the low limb holds the rounding residual of the high one (|r| <= 1/2) in int8


def _qmax(bits: int) -> int:
  return {8: 127, 4: 7}[bits]


def _storage(bits: int):
  return {8: jnp.int8, 4: jnp.int4}[bits]


def group_size(contracted: int, bits: int, group: int = 128) -> int:
  """Values per scale: all of them for int8, else the largest divisor of the contracted
  size that is at most `group`."""
  if bits == 8:
    return contracted
  return max(d for d in range(1, min(group, contracted) + 1) if contracted % d == 0)


def _grouped_shape(shape, contract, g):
  """(*before, G, g, *after) for `shape` whose adjacent axes `contract` merge into G x g."""
  first, last = contract[0] % len(shape), contract[-1] % len(shape)
  size = math.prod(shape[first:last + 1])
  return (*shape[:first], size // g, g, *shape[last + 1:]), first


def _normalize(contract, ndim):
  axes = tuple(sorted(a % ndim - ndim for a in contract))
  if axes != tuple(range(axes[0], axes[0] + len(axes))):
    raise ValueError(f"contracted axes {contract} must be adjacent")
  return axes


def _stored_order(ndim: int, contract) -> tuple[int, ...]:
  """The float array's axes in the order `values` stores them: free ones, then contracted."""
  contracted = [a % ndim for a in contract]
  return (*(a for a in range(ndim) if a not in contracted), *contracted)


@struct.dataclass
class QArray:
  """An int8 / int4 array with float32 group scales, standing in for a float array."""

  values: jax.Array
  scale: jax.Array
  contract: tuple[int, ...] = struct.field(pytree_node=False)
  bits: int = struct.field(pytree_node=False)

  @property
  def num_free(self) -> int:
    return self.values.ndim - len(self.contract)

  @property
  def order(self) -> tuple[int, ...]:
    return _stored_order(self.values.ndim, self.contract)

  @property
  def shape(self) -> tuple[int, ...]:
    """The float array's shape."""
    out = [0] * self.values.ndim
    for axis, size in zip(self.order, self.values.shape):
      out[axis] = size
    return tuple(out)

  @property
  def group(self) -> int:
    return self.values.size // self.scale.size

  def _grouped_values(self, dtype) -> jax.Array:  # (*free, G, g)
    free = self.values.shape[:self.num_free]
    return self.values.reshape(*free, -1, self.group).astype(dtype)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    w = (self._grouped_values(jnp.float32) * self.scale).reshape(self.values.shape)
    return jnp.transpose(w, np.argsort(self.order)).astype(dtype)

  def quantized_take(self, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` (along axis 0) of the dequantised table."""
    if self.values.ndim + self.contract[0] == 0:
      raise ValueError(f"rows of a quantized array are taken along axis 0, which is contracted "
                       f"(contract={self.contract}); quantize the table with contract=(-1,)")
    rows = QArray(jnp.take(self.values, ids.reshape(-1), axis=0),
                  jnp.take(self.scale, ids.reshape(-1), axis=0), self.contract, self.bits)
    return rows.dequantize(dtype).reshape(*ids.shape, *self.shape[1:])

  def quantized_dot(self, x: jax.Array, dimension_numbers, dtype) -> jax.Array:
    """lax.dot_general(x, self.dequantize(), dimension_numbers) in `dtype`, computed as int8
    dots with int32 accumulation (see the module docstring)."""
    (x_contract, k_contract), (x_batch, k_batch) = dimension_numbers
    nd, nf = self.values.ndim, self.num_free
    if _normalize(k_contract, nd) != self.contract:
      raise ValueError(
          f"a kernel of shape {self.shape} quantized for contracted axes {self.contract} "
          f"is used in a dot contracting axes {tuple(k_contract)}; quantize it with "
          f"contract={_normalize(k_contract, nd)} (llm.inference.quantize)")
    x_contract = _normalize(x_contract, x.ndim)
    x_grouped, x_first = _grouped_shape(x.shape, x_contract, self.group)
    x_batch = tuple(a % x.ndim if a % x.ndim < x_first else a % x.ndim - len(x_contract) + 2
                    for a in x_batch)
    k_batch = tuple(self.order.index(a % nd) for a in k_batch)  # stored positions

    x_f32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x_f32), axis=tuple(a % x.ndim for a in x_contract), keepdims=True)
    row_scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    scaled = x_f32 / row_scale
    hi = jnp.round(scaled)
    lo = jnp.round((scaled - hi) * LIMB)
    limbs = jnp.stack([hi, lo]).astype(jnp.int8).reshape(2, *x_grouped)  # limb axis in front

    # Groups are a batch axis of the dot: each group's int32 sums get their own scale.
    nb = len(x_batch)
    acc = jax.lax.dot_general(
        limbs, self._grouped_values(jnp.int8),
        (((x_first + 2,), (nf + 1,)), ((*(a + 1 for a in x_batch), x_first + 1), (*k_batch, nf))),
        preferred_element_type=jnp.int32).astype(jnp.float32)
    acc = jnp.take(acc, 0, axis=nb + 1) + jnp.take(acc, 1, axis=nb + 1) / LIMB
    # acc: (*batch, G, *x_free, *k_free); bring the scales to that layout.
    x_free = [a for a in range(len(x_grouped)) if a not in (*x_batch, x_first, x_first + 1)]
    k_free = [a for a in range(nf) if a not in k_batch]
    k_scale = jnp.transpose(self.scale, (*k_batch, nf, *k_free, nf + 1))[..., 0]
    k_scale = k_scale.reshape(*k_scale.shape[:nb + 1], *([1] * len(x_free)),
                              *k_scale.shape[nb + 1:])
    y = jnp.sum(acc * k_scale, axis=nb)
    x_scale = jnp.transpose(row_scale.reshape(x_grouped[:x_first] + (1, 1) +
                                              x_grouped[x_first + 2:]),
                            (*x_batch, *x_free, x_first, x_first + 1))[..., 0, 0]
    x_scale = x_scale.reshape(*x_scale.shape, *([1] * len(k_free)))
    return (y * x_scale).astype(dtype)


def concatenate(arrays, axis: int) -> QArray:
  """QArrays quantized alike, joined along a free (not contracted) `axis` of their float
  shape: the fused q/k/v (or gate/up) kernel of decoding, with each part's scales kept."""
  first = arrays[0]
  nd = first.values.ndim
  axis %= nd
  if any((a.contract, a.bits, a.group) != (first.contract, first.bits, first.group)
         for a in arrays) or axis in [c % nd for c in first.contract]:
    raise ValueError(f"concatenate: the arrays must be quantized alike (contract, bits, group) "
                     f"and axis={axis} must not be contracted (contract={first.contract})")
  stored = first.order.index(axis)  # the same position in `values` and `scale`
  return QArray(jnp.concatenate([a.values for a in arrays], axis=stored),
                jnp.concatenate([a.scale for a in arrays], axis=stored),
                first.contract, first.bits)


def quantize(w: jax.Array, contract: tuple[int, ...], bits: int, group: int = 128) -> QArray:
  """Symmetric quantization of `w` with one scale per output channel and group of the
  (adjacent) `contract` axes: scale = max|w| / qmax, q = round(w / scale)."""
  contract = _normalize(contract, w.ndim)
  w_stored = jnp.transpose(jnp.asarray(w, jnp.float32), _stored_order(w.ndim, contract))
  free = w_stored.shape[:w.ndim - len(contract)]
  g = group_size(math.prod(w_stored.shape[len(free):]), bits, group)
  w_grouped = w_stored.reshape(*free, -1, g)
  qmax = _qmax(bits)
  amax = jnp.max(jnp.abs(w_grouped), axis=-1, keepdims=True)
  scale = jnp.where(amax > 0, amax / qmax, 1.0)
  q = jnp.clip(jnp.round(w_grouped / scale), -qmax, qmax).astype(jnp.int8)
  return QArray(q.astype(_storage(bits)).reshape(w_stored.shape), scale, contract, bits)
