"""Building blocks shared by the model families: embeddings, the transformer block,
and the (scanned, rematerialized) stack of blocks."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.config import ModelConfig
from llm.layers.attention import Attention
from llm.layers.common import dtype_of
from llm.layers.linear import dot, kernel_param, logical_init, take_rows
from llm.layers.mlp import MLP
from llm.layers.moe import STATS, MoE
from llm.layers.norm import Norm

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def make_norm(cfg: ModelConfig, name: str) -> Norm:
  return Norm(cfg.norm, cfg.norm_eps, use_bias=cfg.use_bias, dtype=cfg.dtype,
              param_dtype=cfg.param_dtype, name=name)


def residual(cfg: ModelConfig, x_BTD, sublayer, norm_name: str, deterministic: bool):
  """One residual sublayer, as every block (decoder, encoder, encoder-decoder) has it:
  pre-norm x + dropout(f(norm(x))) (GPT-2, LLaMA, T5) or post-norm norm(x + dropout(f(x)))
  (BERT, BART). Called inside a block's compact __call__, so the norm is its child."""
  norm = make_norm(cfg, norm_name)
  drop = lambda h: nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
  if cfg.post_norm:
    return norm(x_BTD + drop(sublayer(x_BTD)))
  return x_BTD + drop(sublayer(norm(x_BTD)))


class Block(nn.Module):
  """Transformer block. Pre-norm (GPT-2, LLaMA, T5): x + f(norm(x)); post-norm (BERT,
  BART): norm(x + f(x)); f is self-attention, then the MLP."""

  cfg: ModelConfig
  causal: bool = True
  decode: bool = False
  deterministic: bool = True
  moe: bool = False  # the MLP is a mixture of experts

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT, prefix_BT=None, rel_table_KN=None):
    cfg = self.cfg
    attention = lambda h: Attention(cfg, name="attn")(
        h, positions_BT, segment_ids_BT, decode=self.decode, deterministic=self.deterministic,
        causal=self.causal, prefix_BT=prefix_BT, rel_table_KN=rel_table_KN)
    if self.moe:
      mlp = lambda h: MoE(cfg, name="moe")(h, self.deterministic, segment_ids_BT != 0)
    else:
      mlp = lambda h: MLP(cfg, name="mlp")(h, self.deterministic)
    for sublayer, norm_name in ((attention, "attn_norm"), (mlp, "mlp_norm")):
      x_BTD = residual(cfg, x_BTD, sublayer, norm_name, self.deterministic)
    x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_length", "act_embed"))
    return x_BTD, None


def is_moe_layer(cfg: ModelConfig, i: int) -> bool:
  return cfg.moe.num_experts > 0 and (i + 1) % cfg.moe.every == 0


class BlockGroup(nn.Module):
  """`cfg.moe.every` consecutive blocks, the last with a MoE MLP: the unit that is
  scanned when dense and MoE layers interleave (scan needs identical iterations)."""

  block_cls: Any
  cfg: ModelConfig
  block_kwargs: tuple  # sorted (name, value) pairs: module fields must be hashable

  @nn.compact
  def __call__(self, x, *args):
    every = self.cfg.moe.every
    for j in range(every):
      x, _ = self.block_cls(self.cfg, **dict(self.block_kwargs), moe=j == every - 1,
                            name=f"block_{j}")(x, *args)
    return x, None


def block_stack(block_cls, cfg: ModelConfig, num_args: int = 3, **block_kwargs):
  """Returns a callable applying cfg.num_layers blocks, scanned and rematerialized per cfg.

  `num_args` is the number of arguments after x that every block receives unchanged.
  MoE replaces the MLP of every moe.every-th layer; scanned, with moe.every > 1, the
  scan runs over groups of moe.every layers ("layers/block_j", stacked per group).
  """
  if cfg.remat != "none":
    block_cls = nn.remat(block_cls, policy=_REMAT_POLICIES[cfg.remat],
                         prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    grouped = cfg.moe.num_experts > 0 and cfg.moe.every > 1
    unit = BlockGroup if grouped else block_cls
    scanned = nn.scan(unit, variable_axes={"params": 0, "cache": 0, STATS: 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * num_args,
                      length=cfg.num_layers // cfg.moe.every if grouped else cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    if grouped:
      stack = scanned(block_cls, cfg, tuple(sorted(block_kwargs.items())), name="layers")
    else:
      stack = scanned(cfg, **block_kwargs, moe=is_moe_layer(cfg, 0), name="layers")
    return lambda x, *args: stack(x, *args)[0]

  blocks = [block_cls(cfg, **block_kwargs, moe=is_moe_layer(cfg, i), name=f"layers_{i}")
            for i in range(cfg.num_layers)]

  def apply(x, *args):
    for block in blocks:
      x, _ = block(x, *args)
    return x
  return apply


class Embed(nn.Module):
  """Token embedding; `attend` reuses the table as a tied output projection.

  Compact, with both uses in `__call__`, so interceptors (LoRA, prompt tuning) may create
  params beside the table in either use.
  """

  num_embeddings: int
  features: int
  axes: tuple = ("vocab", "embed")
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02

  @nn.compact
  def __call__(self, ids_or_x, attend: bool = False):
    table = kernel_param(
        self, "embedding", logical_init(nn.initializers.normal(self.init_std), self.axes),
        (self.num_embeddings, self.features), dtype_of(self.param_dtype))
    if attend:  # logits x E^T, through the one `dot`
      return dot(ids_or_x, table, (((ids_or_x.ndim - 1,), (1,)), ((), ())), self.dtype)
    return take_rows(table, ids_or_x, self.dtype)

  def attend(self, x_BTD):
    return self(x_BTD, attend=True)


def embed_inputs(cfg: ModelConfig, embed: Embed, tokens_BT, positions_BT, *,
                 inputs_embeds_BTD=None, position_offset: int = 0, token_types_BT=None):
  """The prologue of every stack: the token embeddings (or `inputs_embeds_BTD` given
  instead, e.g. another model's features), plus learned positions (a table of max_len +
  position_offset rows), plus token types when given (BERT), then the embedding norm.
  Called inside a model's compact __call__, so the tables are its children."""
  kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, init_std=cfg.init_std)
  if inputs_embeds_BTD is None:
    x_BTD = embed(tokens_BT)
  else:
    x_BTD = inputs_embeds_BTD.astype(dtype_of(cfg.dtype))
  if cfg.positions == "learned":
    x_BTD = x_BTD + Embed(cfg.max_len + position_offset, cfg.d_model, axes=(None, "embed"),
                          name="pos_embed", **kw)(positions_BT + position_offset)
  if token_types_BT is not None:
    x_BTD = x_BTD + Embed(cfg.type_vocab_size, cfg.d_model, axes=(None, "embed"),
                          name="type_embed", **kw)(token_types_BT)
  if cfg.embed_norm:
    x_BTD = make_norm(cfg, "embed_norm")(x_BTD)
  return x_BTD


def input_shape(tokens_BT, inputs_embeds_BTD,
                name: str = "inputs_embeds_BTD") -> tuple[int, int]:
  """(B, T) of a model's input: token ids or, instead, input embeddings (exactly one;
  `name` is the embeddings' argument, for the error)."""
  if (tokens_BT is None) == (inputs_embeds_BTD is None):
    raise ValueError(f"pass either tokens or {name} (input embeddings), not both "
                     "or neither")
  return (tokens_BT if inputs_embeds_BTD is None else inputs_embeds_BTD).shape[:2]


def default_positions(segment_ids_BT: jax.Array) -> jax.Array:
  """Positions counting real tokens only, so left padding does not shift them."""
  real_BT = (segment_ids_BT != 0).astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(real_BT, axis=1) - 1, 0)


def unscanned(module: nn.Module, params: dict):
  """The same model with per-layer params ("layers_i") instead of stacked trees.

  Decoding reads every weight once per token; from stacked params XLA copies each
  layer's slice out of the stack before using it, which costs a ~25% slower decode.
  """
  if not module.cfg.scan_layers:
    return module, params

  def split(tree):
    if not isinstance(tree, dict):
      return tree
    out = {k: split(v) for k, v in tree.items() if k != "layers"}
    if "layers" in tree:
      stacked = tree["layers"]
      groups = sorted((k for k in stacked if k.startswith("block_")),
                      key=lambda k: int(k.split("_")[1]))
      parts = [stacked[k] for k in groups] if groups else [stacked]  # MoE groups of layers
      for g in range(jax.tree_util.tree_leaves(stacked)[0].shape[0]):
        for j, part in enumerate(parts):
          out[f"layers_{g * len(parts) + j}"] = jax.tree_util.tree_map(lambda x: x[g], part)
    return out
  return module.clone(cfg=dataclasses.replace(module.cfg, scan_layers=False)), split(params)


def check_length(cfg: ModelConfig, length: int, what: str = "sequence") -> None:
  """A learned position table has max_len rows; a longer input would silently reuse the
  last one (jnp.take clamps), so refuse it at trace time."""
  if cfg.positions == "learned" and length > cfg.max_len:
    raise ValueError(f"{what} of {length} tokens exceeds config.model.max_len={cfg.max_len} "
                     "(the position table); shorten it or raise max_len")
