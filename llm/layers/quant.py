"""Weight-only int8 / int4 quantization: a quantized array and its dot and row lookup.

A `QArray` replaces a float kernel or embedding table in a param tree. `llm.layers.linear`
calls its `quantized_dot` / `quantized_take`, so every `Linear`, `ExpertLinear` and the tied
embedding use it without the models knowing.

Layout. The contracted axes of a kernel (`contract`, negative so that a leading layer
axis stacked by `nn.scan` does not move them) are adjacent; merged into one axis of size C
they split into G groups of g = C / G values, each with one float32 scale (symmetric:
w ~ scale * q, q in [-qmax, qmax]). int8 has one group (a scale per output channel);
int4 has groups of 128 (or of C when smaller). `values` keeps the float array's layout
and `scale` is the grouped view of that shape with the group axis of size 1:
(*before, G, 1, *after). That is the layout XLA wants for a batched dot (experts; int4's
groups): (batch, contracted, free). An int8 kernel whose dot has no batch axis (`Linear`,
the tied table) is instead stored with `contract_last`: values (*free, *contracted),
scale (*free, 1), and its dot is one rank-2 dot against the (F, C) view. XLA:CPU's int8
dot reads that layout 1.15-3x faster than (C, F) (3x for a narrow output, an MLP's down
projection). A leading layer axis stays first in both layouts, for `nn.scan`. `shape`
is always the float array's; `llm.layers.linear.kernel_param` checks it.

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


def _stored_order(ndim: int, contract, contract_last: bool) -> tuple[int, ...]:
  """The float array's axes in the order `values` stores them."""
  if not contract_last:
    return tuple(range(ndim))
  contracted = [a % ndim for a in contract]
  return (*(a for a in range(ndim) if a not in contracted), *contracted)


def _limbs(x: jax.Array, axes: tuple[int, ...]):
  """int8 (hi, lo) with x ~ s (hi + lo / LIMB), and s = max|x| / 127 over `axes` (kept)."""
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
  row_scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  scaled = x / row_scale
  hi = jnp.round(scaled)
  lo = jnp.round((scaled - hi) * LIMB)
  return hi.astype(jnp.int8), lo.astype(jnp.int8), row_scale


@struct.dataclass
class QArray:
  """An int8 / int4 array with float32 group scales, standing in for a float array."""

  values: jax.Array
  scale: jax.Array
  contract: tuple[int, ...] = struct.field(pytree_node=False)
  bits: int = struct.field(pytree_node=False)
  contract_last: bool = struct.field(pytree_node=False, default=False)

  @property
  def order(self) -> tuple[int, ...]:
    return _stored_order(self.values.ndim, self.contract, self.contract_last)

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

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    if self.contract_last:
      w = self.values.reshape(self.scale.shape[:-1] + (-1,)).astype(jnp.float32) * self.scale
      return jnp.transpose(w.reshape(self.values.shape), np.argsort(self.order)).astype(dtype)
    grouped, _ = _grouped_shape(self.values.shape, self.contract, self.group)
    w = self.values.reshape(grouped).astype(jnp.float32) * self.scale
    return w.reshape(self.values.shape).astype(dtype)

  def quantized_take(self, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` (along axis 0) of the dequantised table."""
    if self.values.ndim + self.contract[0] == 0:
      raise ValueError(f"rows of a quantized array are taken along axis 0, which is contracted "
                       f"(contract={self.contract}); quantize the table with contract=(-1,)")
    rows = QArray(jnp.take(self.values, ids.reshape(-1), axis=0),
                  jnp.take(self.scale, ids.reshape(-1), axis=0), self.contract, self.bits,
                  self.contract_last)
    return rows.dequantize(dtype).reshape(*ids.shape, *self.shape[1:])

  def quantized_dot(self, x: jax.Array, dimension_numbers, dtype) -> jax.Array:
    """lax.dot_general(x, self.dequantize(), dimension_numbers) in `dtype`, computed as int8
    dots with int32 accumulation (see the module docstring)."""
    (x_contract, k_contract), (x_batch, k_batch) = dimension_numbers
    nd = self.values.ndim
    if _normalize(k_contract, nd) != self.contract:
      raise ValueError(
          f"a kernel of shape {self.shape} quantized for contracted axes {self.contract} "
          f"is used in a dot contracting axes {tuple(k_contract)}; quantize it with "
          f"contract={_normalize(k_contract, nd)} (llm.inference.quantize)")
    x_contract = _normalize(x_contract, x.ndim)
    if self.contract_last:
      return self._rank2_dot(x, x_contract, k_batch, dtype)
    g = self.group
    x_grouped, x_first = _grouped_shape(x.shape, x_contract, g)
    k_grouped, k_first = _grouped_shape(self.values.shape, self.contract, g)
    shift = lambda axes, first, n: tuple(a % n if a % n < first else a % n - len(self.contract)
                                         + 2 for a in axes)
    x_batch, k_batch = shift(x_batch, x_first, x.ndim), shift(k_batch, k_first, nd)

    hi, lo, row_scale = _limbs(x, tuple(a % x.ndim for a in x_contract))
    limbs = jnp.stack([hi, lo]).reshape(2, *x_grouped)  # limb axis in front

    # Groups are a batch axis of the dot: each group's int32 sums get their own scale.
    nb = len(x_batch)
    acc = jax.lax.dot_general(
        limbs, self.values.reshape(k_grouped).astype(jnp.int8),
        (((x_first + 2,), (k_first + 1,)),
         ((*(a + 1 for a in x_batch), x_first + 1), (*k_batch, k_first))),
        preferred_element_type=jnp.int32).astype(jnp.float32)
    acc = jnp.take(acc, 0, axis=nb + 1) + jnp.take(acc, 1, axis=nb + 1) / LIMB
    # acc: (*batch, G, *x_free, *k_free); bring the scales to that layout.
    x_free = [a for a in range(len(x_grouped)) if a not in (*x_batch, x_first, x_first + 1)]
    k_free = [a for a in range(len(k_grouped)) if a not in (*k_batch, k_first, k_first + 1)]
    k_scale = jnp.transpose(self.scale, (*k_batch, k_first, *k_free, k_first + 1))[..., 0]
    k_scale = k_scale.reshape(*k_scale.shape[:nb + 1], *([1] * len(x_free)),
                              *k_scale.shape[nb + 1:])
    y = jnp.sum(acc * k_scale, axis=nb)
    x_scale = jnp.transpose(row_scale.reshape(x_grouped[:x_first] + (1, 1) +
                                              x_grouped[x_first + 2:]),
                            (*x_batch, *x_free, x_first, x_first + 1))[..., 0, 0]
    x_scale = x_scale.reshape(*x_scale.shape, *([1] * len(k_free)))
    return (y * x_scale).astype(dtype)

  def _rank2_dot(self, x, x_contract, k_batch, dtype) -> jax.Array:
    """The dot of a `contract_last` kernel: (2 R, C) limbs x (F, C) values, one rank-2 dot
    (XLA:CPU transposes a batched or higher-rank int8 operand in memory at every call)."""
    if k_batch:
      raise ValueError(f"a kernel quantized with contract_last is used in a dot with batch "
                       f"axes {tuple(k_batch)}; quantize it with contract_last=False")
    x_free = [a for a in range(x.ndim) if a - x.ndim not in x_contract]
    free_shape = [x.shape[a] for a in x_free]
    x_RC = jnp.transpose(x, (*x_free, *(a % x.ndim for a in x_contract)))
    x_RC = x_RC.reshape(math.prod(free_shape), -1).astype(jnp.float32)
    hi, lo, row_scale = _limbs(x_RC, (1,))
    limbs = jnp.concatenate([hi, lo])
    k_free_shape = self.values.shape[:self.values.ndim - len(self.contract)]
    values_FC = self.values.reshape(math.prod(k_free_shape), -1)
    acc = jax.lax.dot_general(limbs, values_FC, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32).astype(jnp.float32)
    rows = x_RC.shape[0]
    y = (acc[:rows] + acc[rows:] / LIMB) * self.scale.reshape(1, -1) * row_scale
    return y.reshape(*free_shape, *k_free_shape).astype(dtype)


def concatenate(arrays, axis: int) -> QArray:
  """QArrays quantized alike, joined along a free (not contracted) `axis` of their values:
  the fused q/k/v (or gate/up) kernel of decoding, with each part's scales kept."""
  first = arrays[0]
  nd = first.values.ndim
  axis %= nd
  alike = lambda a: (a.contract, a.bits, a.group, a.contract_last)
  if any(alike(a) != alike(first) for a in arrays) or axis in [c % nd for c in first.contract]:
    raise ValueError(f"concatenate: the arrays must be quantized alike (contract, bits, group, "
                     f"contract_last) and axis={axis} must not be contracted "
                     f"(contract={first.contract})")
  if first.contract_last:  # free axes lead both values and scale
    value_axis = scale_axis = first.order.index(axis)
  else:  # the scales merge the contracted axes into (G, 1): later axes shift
    value_axis = axis
    scale_axis = axis if axis < first.contract[0] % nd else axis + 2 - len(first.contract)
  return QArray(jnp.concatenate([a.values for a in arrays], axis=value_axis),
                jnp.concatenate([a.scale for a in arrays], axis=scale_axis),
                first.contract, first.bits, first.contract_last)


def quantize(w: jax.Array, contract: tuple[int, ...], bits: int, group: int = 128,
             contract_last: bool = False) -> QArray:
  """Symmetric quantization of `w` with one scale per output channel and group of the
  (adjacent) `contract` axes: scale = max|w| / qmax, q = round(w / scale). With
  `contract_last` (int8 only) the values are stored (*free, *contracted), for dots with no
  batch axis (see the module docstring)."""
  contract = _normalize(contract, w.ndim)
  if contract_last:
    if bits != 8:
      raise ValueError(f"contract_last is for int8 (one scale per output channel), not "
                       f"int{bits}: its groups are a batch axis of the dot")
    w_stored = jnp.transpose(jnp.asarray(w, jnp.float32), _stored_order(w.ndim, contract, True))
    free = w_stored.shape[:w.ndim - len(contract)]
    w_FC = w_stored.reshape(*free, -1)
    amax = jnp.max(jnp.abs(w_FC), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127, 1.0)
    q = jnp.clip(jnp.round(w_FC / scale), -127, 127).astype(jnp.int8)
    return QArray(q.reshape(w_stored.shape), scale, contract, bits, True)
  size = math.prod(w.shape[a] for a in contract)
  grouped, first = _grouped_shape(w.shape, contract, group_size(size, bits, group))
  w_grouped = jnp.asarray(w, jnp.float32).reshape(grouped)
  qmax = _qmax(bits)
  amax = jnp.max(jnp.abs(w_grouped), axis=first + 1, keepdims=True)
  scale = jnp.where(amax > 0, amax / qmax, 1.0)
  q = jnp.clip(jnp.round(w_grouped / scale), -qmax, qmax).astype(jnp.int8)
  return QArray(q.astype(_storage(bits)).reshape(w.shape), scale, contract, bits)
