"""Encoder-only transformer (BERT / RoBERTa): bidirectional stack with MLM, pooled
classification and feature-extraction outputs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.config import ModelConfig
from llm.layers.linear import Linear, logical_init
from llm.layers.mlp import ACTIVATIONS
from llm.models.blocks import (Block, Embed, block_stack, check_length, default_positions,
                               embed_inputs, input_shape, make_norm)

OUTPUTS = ("mlm", "hidden", "pooled", "classify")


def mean_pool(hidden_BTD: jax.Array, valid_BT: jax.Array) -> jax.Array:
  """Average of the hidden states over real (non-padding) tokens: sentence embeddings."""
  weights_BT1 = valid_BT.astype(hidden_BTD.dtype)[..., None]
  return (hidden_BTD * weights_BT1).sum(1) / jnp.maximum(weights_BT1.sum(1), 1e-9)


class Encoder(nn.Module):
  """tokens (B, T) -> one of `OUTPUTS`:

  mlm: logits (B, T, V) from the MLM head (dense + act + norm, tied decoder + bias);
  hidden: final hidden states (B, T, D); pooled: tanh(dense(h[:, 0])) (B, D);
  classify: logits (B, num_labels) over the pooled output (needs `num_labels`).
  `segment_ids` (0 = padding) limit attention to each packed piece; `token_types`
  are BERT's sentence A/B ids; `inputs_embeds_BTD` (B, T, D) replaces the token lookup
  (pass tokens_BT=None).
  """

  cfg: ModelConfig
  num_labels: int = 0

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, token_types_BT=None,
               deterministic: bool = True, output: str = "mlm", inputs_embeds_BTD=None):
    if output not in OUTPUTS:
      raise ValueError(f"output={output!r}: must be one of {', '.join(OUTPUTS)}")
    cfg = self.cfg
    shape_BT = input_shape(tokens_BT, inputs_embeds_BTD)
    check_length(cfg, shape_BT[1])
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones(shape_BT, jnp.int32)
    if positions_BT is None:
      positions_BT = default_positions(segment_ids_BT)
    embed = Embed(cfg.vocab_size, cfg.d_model, name="embed", dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, init_std=cfg.init_std)
    if cfg.type_vocab_size and token_types_BT is None:
      token_types_BT = jnp.zeros(shape_BT, jnp.int32)
    x_BTD = embed_inputs(cfg, embed, tokens_BT, positions_BT, inputs_embeds_BTD=inputs_embeds_BTD,
                         position_offset=cfg.position_offset,
                         token_types_BT=token_types_BT if cfg.type_vocab_size else None)
    x_BTD = self.perturb("embedded", x_BTD)
    x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
    stack = block_stack(Block, cfg, num_args=3, causal=False, deterministic=deterministic)
    hidden_BTD = stack(x_BTD, positions_BT, segment_ids_BT, None)
    if not cfg.post_norm:  # pre-norm stacks end with a norm; post-norm ones already did
      hidden_BTD = make_norm(cfg, "final_norm")(hidden_BTD)

    outputs = {"hidden": hidden_BTD}
    initializing = self.is_initializing()  # create every head's params at init
    if output == "mlm" or initializing:
      outputs["mlm"] = self._mlm_head(hidden_BTD, embed)
    if output in ("pooled", "classify") or initializing:
      outputs["pooled"] = jnp.tanh(self._dense(cfg.d_model, "pooler")(hidden_BTD[:, 0]))
      if self.num_labels and (output == "classify" or initializing):
        pooled = nn.Dropout(cfg.dropout)(outputs["pooled"], deterministic=deterministic)
        outputs["classify"] = self._dense(self.num_labels, "classifier", out_axis=None)(
            pooled).astype(jnp.float32)
    if output not in outputs:
      raise ValueError("output='classify' needs num_labels > 0 (Encoder(cfg, num_labels=N))")
    return outputs[output]

  def _dense(self, features, name, out_axis="embed"):
    cfg = self.cfg
    return Linear((features,), ("embed", out_axis), use_bias=True, dtype=cfg.dtype,
                  param_dtype=cfg.param_dtype, init_std=cfg.init_std, name=name)

  def _mlm_head(self, hidden_BTD, embed: Embed):
    cfg = self.cfg
    h_BTD = ACTIVATIONS[cfg.activation](self._dense(cfg.d_model, "mlm_dense")(hidden_BTD))
    h_BTD = make_norm(cfg, "mlm_norm")(h_BTD)
    logits_BTV = embed.attend(h_BTD)
    bias_V = self.param("mlm_bias", logical_init(nn.initializers.zeros, ("vocab",)),
                        (cfg.vocab_size,), jnp.float32)
    return (logits_BTV.astype(jnp.float32) + bias_V).astype(jnp.float32)
