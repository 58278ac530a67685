"""Decoder-only transformer (GPT-2 / LLaMA style): causal stack, LM head, cached decoding."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.config import ModelConfig
from llm.layers.attention import Attention
from llm.layers.common import dtype_of
from llm.layers.linear import Linear, logical_init
from llm.layers.mlp import MLP
from llm.layers.norm import Norm

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def make_norm(cfg: ModelConfig, name: str) -> Norm:
  return Norm(cfg.norm, cfg.norm_eps, use_bias=cfg.use_bias, dtype=cfg.dtype,
              param_dtype=cfg.param_dtype, name=name)


class DecoderBlock(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  cfg: ModelConfig
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT):
    cfg = self.cfg
    h_BTD = make_norm(cfg, "attn_norm")(x_BTD)
    h_BTD = Attention(cfg, name="attn")(h_BTD, positions_BT, segment_ids_BT,
                                        decode=self.decode, deterministic=self.deterministic)
    x_BTD = x_BTD + nn.Dropout(cfg.dropout)(h_BTD, deterministic=self.deterministic)
    h_BTD = MLP(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(x_BTD), self.deterministic)
    x_BTD = x_BTD + nn.Dropout(cfg.dropout)(h_BTD, deterministic=self.deterministic)
    x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_length", "act_embed"))
    return x_BTD, None


def block_stack(block_cls, cfg: ModelConfig, **block_kwargs):
  """Returns a callable applying cfg.num_layers blocks, scanned and rematerialized per cfg."""
  if cfg.remat != "none":
    block_cls = nn.remat(block_cls, policy=_REMAT_POLICIES[cfg.remat],
                         prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    scanned = nn.scan(block_cls, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    stack = scanned(cfg, **block_kwargs, name="layers")
    return lambda x, *args: stack(x, *args)[0]

  blocks = [block_cls(cfg, **block_kwargs, name=f"layers_{i}") for i in range(cfg.num_layers)]

  def apply(x, *args):
    for block in blocks:
      x, _ = block(x, *args)
    return x
  return apply


class Embed(nn.Module):
  """Token embedding; `attend` reuses the table as a tied output projection."""

  num_embeddings: int
  features: int
  axes: tuple = ("vocab", "embed")
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02

  def setup(self):
    self.embedding = self.param(
        "embedding", logical_init(nn.initializers.normal(self.init_std), self.axes),
        (self.num_embeddings, self.features), dtype_of(self.param_dtype))

  def __call__(self, ids):
    return jnp.take(self.embedding, ids, axis=0).astype(dtype_of(self.dtype))

  def attend(self, x_BTD):
    return jnp.einsum("btd,vd->btv", x_BTD, self.embedding.astype(dtype_of(self.dtype)))


def default_positions(segment_ids_BT: jax.Array) -> jax.Array:
  """Positions counting real tokens only, so left padding does not shift them."""
  real_BT = (segment_ids_BT != 0).astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(real_BT, axis=1) - 1, 0)


class Decoder(nn.Module):
  """tokens (B, T) -> logits (B, T, V) in float32.

  `segment_ids` (0 = padding) keep packed documents apart; `positions` default to the
  count of real tokens before each one. With `decode=True` the call appends to the KV
  cache (see `llm.inference`), so `positions` must then be given explicitly.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, decode: bool = False,
               deterministic: bool = True):
    cfg = self.cfg
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones_like(tokens_BT)
    if positions_BT is None:
      positions_BT = default_positions(segment_ids_BT)
    embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  init_std=cfg.init_std, name="embed")
    x_BTD = embed(tokens_BT)
    if cfg.positions == "learned":
      x_BTD = x_BTD + Embed(cfg.max_len, cfg.d_model, axes=(None, "embed"), dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, init_std=cfg.init_std,
                            name="pos_embed")(positions_BT)
    # A zero "perturbation" lets tests take gradients w.r.t. the input embeddings.
    x_BTD = self.perturb("embedded", x_BTD)
    x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
    x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_length", "act_embed"))
    stack = block_stack(DecoderBlock, cfg, decode=decode, deterministic=deterministic)
    x_BTD = stack(x_BTD, positions_BT, segment_ids_BT)
    x_BTD = make_norm(cfg, "final_norm")(x_BTD)
    if cfg.tie_embeddings:
      logits_BTV = embed.attend(x_BTD)
    else:
      logits_BTV = Linear((cfg.vocab_size,), ("embed", "vocab"), dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, init_std=cfg.init_std,
                          name="lm_head")(x_BTD)
    return nn.with_logical_constraint(logits_BTV.astype(jnp.float32),
                                      ("act_batch", "act_length", "act_vocab"))
