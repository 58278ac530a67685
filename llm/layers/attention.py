"""Dot-product attention (pure jnp) and the multi-head attention module with KV cache.

Einsum letters: B batch, T query length, S key length, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim, D model dim.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm.config import ModelConfig
from llm.layers.linear import Linear
from llm.layers.position import alibi_bias, apply_rope, relative_bias

_NEG_INF = -1e30  # finite, so a fully masked row gives a uniform (not NaN) softmax


def causal_segment_mask(segment_ids_BT: jax.Array) -> jax.Array:
  """mask_BTS: query t sees key s iff s <= t and both lie in the same packed segment."""
  t = segment_ids_BT.shape[1]
  causal_TS = jnp.tril(jnp.ones((t, t), dtype=bool))
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return causal_TS[None] & same_BTS


def prefix_lm_mask(segment_ids_BT: jax.Array, prefix_BT: jax.Array) -> jax.Array:
  """mask_BTS for a prefix LM: causal, except that prefix tokens see the whole prefix.

  Query t sees key s iff both lie in the same packed segment and either s <= t or
  both are prefix tokens (marked per segment by `llm.data.objectives.prefix_lm_split`),
  so the prefix is encoded bidirectionally and the suffix generated left to right.
  """
  t = segment_ids_BT.shape[1]
  causal_TS = jnp.tril(jnp.ones((t, t), dtype=bool))
  prefix_BT = prefix_BT.astype(bool)
  both_prefix_BTS = prefix_BT[:, :, None] & prefix_BT[:, None, :]
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return (causal_TS[None] | both_prefix_BTS) & same_BTS


def segment_mask(segment_ids_BT: jax.Array) -> jax.Array:
  """mask_BTS for bidirectional attention: same segment, and never to padding (id 0)."""
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return same_BTS & (segment_ids_BT[:, None, :] != 0)


def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias_BNTS=None, scale=True,
                          kv_layout: str = "bskh"):
  """Softmax(q k^T / sqrt(H) + bias) v with grouped kv heads; softmax in float32.

  `scale=False` is T5's convention (the 1/sqrt(H) is folded into the query init).
  `kv_layout="bksh"` takes keys and values as (B, K, S, H) (the decode cache's layout).
  """
  return blocked_attention(q_BTNH, [(k_BSKH, v_BSKH, kv_layout)], mask_BTS, bias_BNTS, scale)


def blocked_attention(q_BTNH, blocks, mask_BTS, bias_BNTS=None, scale=True):
  """`dot_product_attention` over keys and values given in blocks along S, each
  (keys, values, layout "bskh" or "bksh"); mask and bias span all blocks, in order.

  A decode step attends to its cache and to its own new tokens as two blocks, so the
  cache it reads is the one it was given: XLA:CPU then writes the new tokens into the
  loop-carried cache in place, where attending to the written cache made it duplicate
  the write and copy every layer's cache three times per step (measured).
  """
  b, t, n, h = q_BTNH.shape
  layout = blocks[0][2]
  k = blocks[0][0].shape[layout.index("k")]
  if k == n:  # one query head per kv head: no group axis (it costs a T x S transpose)
    heads, q = "n", q_BTNH
    kv_letters = lambda layout: layout.replace("k", "n")
  else:
    heads, q = "kg", q_BTNH.reshape(b, t, k, n // k, h)
    kv_letters = lambda layout: layout
  q_sub, logits_sub = f"bt{heads}h", f"b{heads}ts"
  parts = []
  for keys, _, layout in blocks:
    kv = kv_letters(layout)
    if kv.index("s") == 2 and keys.dtype == jnp.float32:  # (B, K, S, H): keys as the
      # dot's lhs, read as stored (as the rhs, XLA:CPU copies the whole key cache into
      # (K, H, S) every step). Half caches keep the rhs form: XLA:CPU has no batched
      # half x half -> float32 dot for the lhs form (UNIMPLEMENTED at batch > 1).
      parts.append(jnp.einsum(f"{kv},{q_sub}->b{heads}st", keys, q,
                              preferred_element_type=jnp.float32).swapaxes(-1, -2))
    else:
      parts.append(jnp.einsum(f"{q_sub},{kv}->{logits_sub}", q, keys,
                              preferred_element_type=jnp.float32))
  logits = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
  if scale:
    logits = logits * (h ** -0.5)
  if bias_BNTS is not None:  # (B or 1, N, T or 1, S)
    logits = logits + (bias_BNTS if k == n else bias_BNTS.reshape(
        bias_BNTS.shape[0], k, n // k, *bias_BNTS.shape[2:]))
  mask = mask_BTS[:, None] if k == n else mask_BTS[:, None, None]
  logits = jnp.where(mask, logits, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(blocks[0][1].dtype)
  ends = np.cumsum([p.shape[-1] for p in parts])[:-1]

  def mix(p, values, kv):
    if kv.index("s") == 2:  # (B, K, S, H): probs as the lhs, the plain (T, S) x (S, H)
      return jnp.moveaxis(jnp.einsum(f"{logits_sub},{kv}->b{heads}th", p, values), -2, 1)
    return jnp.einsum(f"{logits_sub},{kv}->{q_sub}", p, values)
  out = sum(mix(p, values, kv_letters(layout))
            for p, (_, values, layout) in zip(jnp.split(probs, ends, axis=-1), blocks))
  return out.reshape(b, t, n, h)


def _projection(cfg: ModelConfig, features, axes, name, in_dims=1) -> Linear:
  return Linear(features, axes, in_dims=in_dims, use_bias=cfg.use_bias, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, init_std=cfg.init_std, name=name)


class Attention(nn.Module):
  """Self-attention with optional RoPE, GQA, and an autoregressive KV cache.

  With `decode=True` keys/values go to the "cache" collection at slot = position (counted
  from the row's first token): row b's new tokens fill slots positions_BT[b], and each
  query sees the slots before them and the new tokens up to its own. A row's cached
  length lives outside the module (`llm.inference.DecodeState.end_B`), so rows can hold
  different lengths and rolling a row back is just a smaller end index.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT, decode: bool = False,
               deterministic: bool = True, causal: bool = True, bias_BNTS=None, prefix_BT=None,
               rel_table_KN=None):
    cfg = self.cfg
    n, k, h = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    proj = functools.partial(_projection, cfg)
    if "qkv" in self.variables.get("params", {}):  # fused for decoding (fuse_projections)
      qkv_BTRH = proj((n + 2 * k, h), ("embed", "heads", "head_dim"), "qkv")(x_BTD)
      q_BTNH, k_BTKH, v_BTKH = jnp.split(qkv_BTRH, [n, n + k], axis=2)
    else:
      q_BTNH = proj((n, h), ("embed", "heads", "head_dim"), "query")(x_BTD)
      k_BTKH = proj((k, h), ("embed", "kv_heads", "head_dim"), "key")(x_BTD)
      v_BTKH = proj((k, h), ("embed", "kv_heads", "head_dim"), "value")(x_BTD)
    if cfg.positions == "rope":
      q_BTNH = apply_rope(q_BTNH, positions_BT, cfg.rope_theta)
      k_BTKH = apply_rope(k_BTKH, positions_BT, cfg.rope_theta)
    q_BTNH = nn.with_logical_constraint(q_BTNH, ("act_batch", "act_length", "act_heads", None))

    cache_vars = None
    if decode and self.has_variable("cache", "cached_key"):
      cache_vars = self._cache_vars(None, None, None, None)
      blocks, mask_BTS, k_pos_BS = _cache_blocks(*(c.value for c in cache_vars), k_BTKH,
                                                 v_BTKH, positions_BT)
    else:
      if decode:  # first call (cache init): allocate for this many slots
        self._cache_vars(x_BTD.shape[0], x_BTD.shape[1], k, h)
      blocks, k_pos_BS = [(k_BTKH, v_BTKH, "bskh")], positions_BT
      if prefix_BT is not None:
        mask_BTS = prefix_lm_mask(segment_ids_BT, prefix_BT)
      else:
        mask_BTS = (causal_segment_mask if causal else segment_mask)(segment_ids_BT)

    if rel_table_KN is not None:  # T5: by the keys' positions (decode: their cache slots)
      rel_BNTS = relative_bias(rel_table_KN, positions_BT, k_pos_BS, not causal,
                               cfg.relative_max_distance)
      bias_BNTS = rel_BNTS if bias_BNTS is None else bias_BNTS + rel_BNTS
    if cfg.positions == "alibi":
      alibi_BNTS = alibi_bias(n, k_pos_BS)
      bias_BNTS = alibi_BNTS if bias_BNTS is None else bias_BNTS + alibi_BNTS
    out_BTNH = blocked_attention(q_BTNH, blocks, mask_BTS, bias_BNTS, cfg.scale_attention)
    if cache_vars is not None:
      _write_cache(*cache_vars, *blocks[1][:2], positions_BT, out_BTNH)
    out_BTNH = nn.Dropout(cfg.dropout)(out_BTNH, deterministic=deterministic)
    return proj((cfg.d_model,), ("heads", "head_dim", "embed"), "out", in_dims=2)(out_BTNH)

  def _cache_vars(self, batch, length, k, h):
    dtype = jnp.dtype(self.cfg.dtype)
    # (B, K, S, H): the attention dots read it as is, with no per-step transpose.
    return (self.variable("cache", "cached_key", jnp.zeros, (batch, k, length, h), dtype),
            self.variable("cache", "cached_value", jnp.zeros, (batch, k, length, h), dtype))


def _cache_blocks(key_BKSH, value_BKSH, k_BTKH, v_BTKH, positions_BT):
  """A decode step's attention inputs: (blocks: the cache as it was and the new tokens;
  their mask; their keys' positions). A query sees the cache's slots before its row's
  first new token (slots past it hold stale or rolled-back tokens) and the new tokens
  up to its own."""
  new_k, new_v = k_BTKH.astype(key_BKSH.dtype), v_BTKH.astype(value_BKSH.dtype)
  (b, t), s = positions_BT.shape, key_BKSH.shape[2]
  slots_BS = jnp.broadcast_to(jnp.arange(s), (b, s))
  cached_BTS = jnp.broadcast_to(slots_BS[:, None] < positions_BT[:, :1, None], (b, t, s))
  new_BTT = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  return ([(key_BKSH, value_BKSH, "bksh"), (new_k, new_v, "bskh")],
          jnp.concatenate([cached_BTS, new_BTT], -1),
          jnp.concatenate([slots_BS, positions_BT], 1))


def _write_cache(key, value, new_k, new_v, positions_BT, out_BTNH):
  """Writes the new tokens into the cache variables after the attention has read them.

  The slots are made to depend on the attention's output (a NaN row writes to slot 0;
  its output is NaN anyway), so XLA sees the cache read before the write and updates
  the cache in place. Without the dependency XLA:CPU copies each layer's cache twice a
  step (~25% of a batch-1 step, measured); an optimization barrier does not order them.
  """
  positions_BT = jnp.where(jnp.isnan(out_BTNH[:, :1, 0, 0]), 0, positions_BT)
  key.value = _write_slots(key.value, new_k, positions_BT)
  value.value = _write_slots(value.value, new_v, positions_BT)


def _write_slots(cache_BKSH, new_BTKH, positions_BT):
  """The cache with row b's new tokens at slots positions_BT[b] (slots past the cache
  are dropped). One scatter of the new tokens alone: inside a decode loop XLA updates
  the carried cache in place, so a step costs its tokens, not the cache's length (an
  elementwise select over every slot cost ~10% of a batch-1 step, measured)."""
  rows_B1 = jnp.arange(new_BTKH.shape[0])[:, None]
  return cache_BKSH.at[rows_B1, :, positions_BT].set(new_BTKH, unique_indices=True,
                                                     mode="drop")


class CrossAttention(nn.Module):
  """Decoder-to-encoder attention. In decoding, keys and values of the encoder output
  are computed on the first (prefill) call, kept in the cache, and reused every step."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, encoded_BSD, mask_BTS, decode: bool = False,
               deterministic: bool = True):
    cfg = self.cfg
    n, k, h = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    proj = functools.partial(_projection, cfg)
    q_BTNH = proj((n, h), ("embed", "heads", "head_dim"), "query")(x_BTD)
    key_proj = proj((k, h), ("embed", "kv_heads", "head_dim"), "key")
    value_proj = proj((k, h), ("embed", "kv_heads", "head_dim"), "value")
    if encoded_BSD is not None:
      k_BSKH, v_BSKH = key_proj(encoded_BSD), value_proj(encoded_BSD)
      if decode:
        self.variable("cache", "cross_key", lambda: k_BSKH).value = k_BSKH
        self.variable("cache", "cross_value", lambda: v_BSKH).value = v_BSKH
    else:  # decode step: reuse the cached projections of the encoder output
      k_BSKH = self.get_variable("cache", "cross_key")
      v_BSKH = self.get_variable("cache", "cross_value")
    out_BTNH = dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, None,
                                     cfg.scale_attention)
    out_BTNH = nn.Dropout(cfg.dropout)(out_BTNH, deterministic=deterministic)
    return proj((cfg.d_model,), ("heads", "head_dim", "embed"), "out", in_dims=2)(out_BTNH)


def cross_mask(q_segment_ids_BT: jax.Array, kv_segment_ids_BS: jax.Array) -> jax.Array:
  """Decoder token t sees encoder token s of the same packed example, never padding."""
  same_BTS = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
  return same_BTS & (kv_segment_ids_BS[:, None, :] != 0)
