"""Dot-product attention (pure jnp) and the multi-head attention module with KV cache.

Einsum letters: B batch, T query length, S key length, N query heads, K kv heads,
G = N / K query heads per kv head, H head dim, D model dim.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

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
  b, t, n, h = q_BTNH.shape
  k = k_BSKH.shape[kv_layout.index("k")]
  if k == n:  # one query head per kv head: no group axis (it costs a T x S transpose)
    return _attention_1h(q_BTNH, k_BSKH, v_BSKH, mask_BTS, bias_BNTS, scale,
                         kv_layout.replace("k", "n"))
  q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
  logits_BKGTS = jnp.einsum(f"btkgh,{kv_layout}->bkgts", q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32)
  if scale:
    logits_BKGTS = logits_BKGTS * (h ** -0.5)
  if bias_BNTS is not None:  # (B or 1, N, T or 1, S)
    bias = bias_BNTS.reshape(bias_BNTS.shape[0], k, n // k, *bias_BNTS.shape[2:])
    logits_BKGTS = logits_BKGTS + bias
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, _NEG_INF)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum(f"bkgts,{kv_layout}->btkgh", probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(b, t, n, h)


def _attention_1h(q_BTNH, k_BSNH, v_BSNH, mask_BTS, bias_BNTS, scale, kv_layout):
  """`dot_product_attention` when every query head has its own kv head (N = K)."""
  logits_BNTS = jnp.einsum(f"btnh,{kv_layout}->bnts", q_BTNH, k_BSNH,
                           preferred_element_type=jnp.float32)
  if scale:
    logits_BNTS = logits_BNTS * (q_BTNH.shape[-1] ** -0.5)
  if bias_BNTS is not None:
    logits_BNTS = logits_BNTS + bias_BNTS
  logits_BNTS = jnp.where(mask_BTS[:, None], logits_BNTS, _NEG_INF)
  probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1).astype(v_BSNH.dtype)
  return jnp.einsum(f"bnts,{kv_layout}->btnh", probs_BNTS, v_BSNH)


def _projection(cfg: ModelConfig, features, axes, name, in_dims=1) -> Linear:
  return Linear(features, axes, in_dims=in_dims, use_bias=cfg.use_bias, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, init_std=cfg.init_std, name=name)


class Attention(nn.Module):
  """Self-attention with optional RoPE, GQA, and an autoregressive KV cache.

  With `decode=True` keys/values go to the "cache" collection at slot = position (counted
  from the row's first token): row b's new tokens fill slots positions_BT[b], and each
  query sees the slots up to its own. A
  row's cached length lives outside the module (`llm.inference.DecodeState.end_B`), so
  rows can hold different lengths and rolling a row back is just a smaller end index.
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

    if decode and self.has_variable("cache", "cached_key"):
      keys, values, mask_BTS = self._update_cache(k_BTKH, v_BTKH, positions_BT)
      layout = "bksh"
    else:
      if decode:  # first call (cache init): allocate for this many slots
        self._cache_vars(x_BTD.shape[0], x_BTD.shape[1], k, h)
      keys, values, layout = k_BTKH, v_BTKH, "bskh"
      if prefix_BT is not None:
        mask_BTS = prefix_lm_mask(segment_ids_BT, prefix_BT)
      else:
        mask_BTS = (causal_segment_mask if causal else segment_mask)(segment_ids_BT)

    s = keys.shape[layout.index("s")]
    if rel_table_KN is not None:  # T5: keys at cache slots (decode) or their positions
      k_pos_BS = (jnp.broadcast_to(jnp.arange(s), (x_BTD.shape[0], s)) if decode
                  else positions_BT)
      rel_BNTS = relative_bias(rel_table_KN, positions_BT, k_pos_BS, not causal,
                               cfg.relative_max_distance)
      bias_BNTS = rel_BNTS if bias_BNTS is None else bias_BNTS + rel_BNTS
    if cfg.positions == "alibi":
      alibi_1NTS = alibi_bias(n, s)
      bias_BNTS = alibi_1NTS if bias_BNTS is None else bias_BNTS + alibi_1NTS
    out_BTNH = dot_product_attention(q_BTNH, keys, values, mask_BTS, bias_BNTS,
                                     cfg.scale_attention, layout)
    out_BTNH = nn.Dropout(cfg.dropout)(out_BTNH, deterministic=deterministic)
    return proj((cfg.d_model,), ("heads", "head_dim", "embed"), "out", in_dims=2)(out_BTNH)

  def _cache_vars(self, batch, length, k, h):
    dtype = jnp.dtype(self.cfg.dtype)
    # (B, K, S, H): the attention dots read it as is, with no per-step transpose.
    return (self.variable("cache", "cached_key", jnp.zeros, (batch, k, length, h), dtype),
            self.variable("cache", "cached_value", jnp.zeros, (batch, k, length, h), dtype))

  def _update_cache(self, k_BTKH, v_BTKH, positions_BT):
    key, value = self._cache_vars(None, None, None, None)
    key.value = _write_slots(key.value, k_BTKH, positions_BT)
    value.value = _write_slots(value.value, v_BTKH, positions_BT)
    # Slots past a query's own hold stale or future tokens (a rolled-back row, padding).
    mask_BTS = jnp.arange(key.value.shape[2])[None, None, :] <= positions_BT[:, :, None]
    return key.value, value.value, mask_BTS


_ONE_HOT_WRITE_MAX = 8  # tokens per call; above that (prefill) the T x S one-hot costs more


def _write_slots(cache_BKSH, new_BTKH, positions_BT):
  """The cache with row b's new tokens at slots positions_BT[b] (slots past the cache
  are dropped).

  A decode step (a few tokens) writes through one elementwise select per token: XLA:CPU
  compiles a scatter (or a dynamic-update-slice) into two fusions, one feeding the
  attention dot and one the loop carry, each on its own copy of the cache, and a one-hot
  einsum into a dot whose output needs a transpose (a copy); the selects fuse into one
  pass that makes the new cache and nothing else. Longer writes (prefill) stay a scatter.
  """
  new_BTKH = new_BTKH.astype(cache_BKSH.dtype)
  if new_BTKH.shape[1] > _ONE_HOT_WRITE_MAX:
    rows_B1 = jnp.arange(new_BTKH.shape[0])[:, None]
    return cache_BKSH.at[rows_B1, :, positions_BT].set(new_BTKH)
  slots_S = jnp.arange(cache_BKSH.shape[2])
  for t in range(new_BTKH.shape[1]):
    hot_B1S1 = (positions_BT[:, t, None] == slots_S)[:, None, :, None]
    cache_BKSH = jnp.where(hot_B1S1, new_BTKH[:, t, :, None, :], cache_BKSH)
  return cache_BKSH


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
