"""Encoder-decoder transformer (T5 / BART): a bidirectional encoder, and a causal decoder
that also attends to the encoder output.

T5: pre-norm RMSNorm without bias, relative-position biases (one learned table per
stack, shared by its layers), no attention scaling, gated GELU in v1.1.
BART: post-norm LayerNorm, learned positions offset by 2, a norm on the embeddings.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from llm.config import ModelConfig
from llm.layers.attention import Attention, CrossAttention, cross_mask
from llm.layers.linear import Linear, logical_init
from llm.layers.mlp import MLP
from llm.layers.moe import MoE
from llm.models.blocks import (Block, Embed, block_stack, check_length, default_positions,
                               embed_inputs, input_shape, make_norm, residual)


class EncDecBlock(nn.Module):
  """Decoder block: self-attention, cross-attention, MLP (each pre- or post-norm)."""

  cfg: ModelConfig
  decode: bool = False
  deterministic: bool = True
  moe: bool = False

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT, rel_table_KN, encoded_BSD,
               cross_mask_BTS):
    cfg = self.cfg
    sublayers = (
        (lambda h: Attention(cfg, name="attn")(h, positions_BT, segment_ids_BT,
                                               decode=self.decode,
                                               deterministic=self.deterministic,
                                               rel_table_KN=rel_table_KN), "attn_norm"),
        (lambda h: CrossAttention(cfg, name="cross")(h, encoded_BSD, cross_mask_BTS,
                                                     decode=self.decode,
                                                     deterministic=self.deterministic),
         "cross_norm"),
        (lambda h: (MoE(cfg, name="moe")(h, self.deterministic, segment_ids_BT != 0) if self.moe
                    else MLP(cfg, name="mlp")(h, self.deterministic)), "mlp_norm"))
    for sublayer, norm_name in sublayers:
      x_BTD = residual(cfg, x_BTD, sublayer, norm_name, self.deterministic)
    x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_length", "act_embed"))
    return x_BTD, None


class Stack(nn.Module):
  """Embeds tokens (shared table; or takes `inputs_embeds_BTD` instead), runs the blocks,
  applies the final norm."""

  cfg: ModelConfig
  embed: Embed
  is_decoder: bool = False

  @nn.compact
  def __call__(self, tokens_BT, positions_BT, segment_ids_BT, encoded_BSD=None,
               cross_mask_BTS=None, decode: bool = False, deterministic: bool = True,
               inputs_embeds_BTD=None):
    cfg = self.cfg
    check_length(cfg, positions_BT.shape[1],
                 "decoder input" if self.is_decoder else "encoder input")
    x_BTD = embed_inputs(cfg, self.embed, tokens_BT, positions_BT,
                         inputs_embeds_BTD=inputs_embeds_BTD,
                         position_offset=cfg.position_offset)
    x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
    rel_table_KN = None
    if cfg.positions == "relative":
      rel_table_KN = self.param("rel_bias", logical_init(nn.initializers.normal(cfg.init_std),
                                                         (None, "heads")),
                                (cfg.relative_buckets, cfg.num_heads), jnp.float32)
    if self.is_decoder:
      layers_cfg = dataclasses.replace(cfg, num_layers=cfg.num_decoder_layers or cfg.num_layers)
      stack = block_stack(EncDecBlock, layers_cfg, num_args=5, decode=decode,
                          deterministic=deterministic)
      x_BTD = stack(x_BTD, positions_BT, segment_ids_BT, rel_table_KN, encoded_BSD,
                    cross_mask_BTS)
    else:
      stack = block_stack(Block, cfg, num_args=4, causal=False, deterministic=deterministic)
      x_BTD = stack(x_BTD, positions_BT, segment_ids_BT, None, rel_table_KN)
    if not cfg.post_norm:
      x_BTD = make_norm(cfg, "final_norm")(x_BTD)
    return nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)


class EncoderDecoder(nn.Module):
  """(encoder tokens (B, S), decoder tokens (B, T)) -> logits (B, T, V) in float32.

  `encode` and `decode` are separate methods so generation runs the encoder once.
  `encoder_inputs_embeds_BSD` (B, S, D) replaces the encoder's token lookup (pass
  encoder_tokens_BS=None; its segment ids then default to all ones).
  """

  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype, init_std=cfg.init_std)
    self.encoder = Stack(cfg, self.embed, is_decoder=False)
    self.decoder = Stack(cfg, self.embed, is_decoder=True)
    if not cfg.tie_embeddings:
      self.lm_head = Linear((cfg.vocab_size,), ("embed", "vocab"), dtype=cfg.dtype,
                            param_dtype=cfg.param_dtype, init_std=cfg.init_std)

  def __call__(self, encoder_tokens_BS, decoder_tokens_BT, encoder_segment_ids_BS=None,
               decoder_positions_BT=None, decoder_segment_ids_BT=None, decode: bool = False,
               deterministic: bool = True, encoder_inputs_embeds_BSD=None):
    shape_BS = input_shape(encoder_tokens_BS, encoder_inputs_embeds_BSD,
                           "encoder_inputs_embeds_BSD")
    if encoder_segment_ids_BS is None:
      encoder_segment_ids_BS = (jnp.ones(shape_BS, jnp.int32) if encoder_tokens_BS is None
                                else (encoder_tokens_BS != 0).astype(jnp.int32))
    encoded_BSD = self.encode(encoder_tokens_BS, encoder_segment_ids_BS, deterministic,
                              encoder_inputs_embeds_BSD)
    return self.decode(decoder_tokens_BT, encoded_BSD, encoder_segment_ids_BS,
                       decoder_positions_BT, decoder_segment_ids_BT, decode, deterministic)

  def encode(self, tokens_BS, segment_ids_BS, deterministic: bool = True,
             inputs_embeds_BSD=None):
    """The encoder output (B, S, D) of tokens_BS, or of `inputs_embeds_BSD` (tokens None)."""
    input_shape(tokens_BS, inputs_embeds_BSD, "inputs_embeds_BSD")
    return self.encoder(tokens_BS, default_positions(segment_ids_BS), segment_ids_BS,
                        deterministic=deterministic, inputs_embeds_BTD=inputs_embeds_BSD)

  def decode(self, tokens_BT, encoded_BSD, encoder_segment_ids_BS, positions_BT=None,
             segment_ids_BT=None, decode: bool = False, deterministic: bool = True):
    """Decoder logits. With decode=True, `encoded_BSD` may be None after the first call
    (the cross-attention keys/values are then read from the cache)."""
    cfg = self.cfg
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones_like(tokens_BT)
    if positions_BT is None:
      positions_BT = default_positions(segment_ids_BT)
    # Unpacked decoding: every decoder token belongs to its row's (segment 1) example.
    cross_BTS = cross_mask(jnp.where(segment_ids_BT != 0, segment_ids_BT, -1)
                           if not decode else jnp.ones_like(segment_ids_BT),
                           encoder_segment_ids_BS)
    h_BTD = self.decoder(tokens_BT, positions_BT, segment_ids_BT, encoded_BSD, cross_BTS,
                         decode=decode, deterministic=deterministic)
    if cfg.tie_embeddings:
      if cfg.positions == "relative":  # T5 v1.0 rescales before the tied projection
        h_BTD = h_BTD * cfg.d_model ** -0.5
      logits_BTV = self.embed.attend(h_BTD)
    else:
      logits_BTV = self.lm_head(h_BTD)
    return logits_BTV.astype(jnp.float32)
