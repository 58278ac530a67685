"""Decoder-only transformer (GPT-2 / LLaMA style): causal stack, LM head, cached decoding."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from llm.config import ModelConfig
from llm.layers.linear import Linear
from llm.models.blocks import (Block, Embed, block_stack, check_length, default_positions,
                               embed_inputs, input_shape, make_norm)

OUTPUTS = ("logits", "hidden", "both")


class Decoder(nn.Module):
  """tokens (B, T) -> logits (B, T, V) in float32.

  `segment_ids` (0 = padding) keep packed documents apart; `positions` default to the
  count of real tokens before each one. `prefix_BT` (prefix LM) marks tokens that
  attend bidirectionally within their segment's prefix. `inputs_embeds_BTD` (B, T, D)
  replaces the token lookup (pass tokens_BT=None); positions and the rest are as for
  tokens. With `decode=True` the call appends to the KV cache (see `llm.inference`), so
  `positions` must then be given.
  `output`: "logits"; "hidden", the final hidden states (B, T, D) without the LM head
  (a reward model's backbone); "both", (logits, hidden) (a policy with a value head).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, decode: bool = False,
               deterministic: bool = True, prefix_BT=None, output: str = "logits",
               inputs_embeds_BTD=None):
    if output not in OUTPUTS:
      raise ValueError(f"output={output!r}: must be one of {', '.join(OUTPUTS)}")
    cfg = self.cfg
    shape_BT = input_shape(tokens_BT, inputs_embeds_BTD)
    check_length(cfg, shape_BT[1])
    if segment_ids_BT is None:
      segment_ids_BT = jnp.ones(shape_BT, jnp.int32)
    if positions_BT is None:
      positions_BT = default_positions(segment_ids_BT)
    embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  init_std=cfg.init_std, name="embed")
    x_BTD = embed_inputs(cfg, embed, tokens_BT, positions_BT, inputs_embeds_BTD=inputs_embeds_BTD)
    # A zero "perturbation" lets tests take gradients w.r.t. the input embeddings.
    x_BTD = self.perturb("embedded", x_BTD)
    x_BTD = nn.Dropout(cfg.dropout)(x_BTD, deterministic=deterministic)
    x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_length", "act_embed"))
    stack = block_stack(Block, cfg, decode=decode, deterministic=deterministic)
    x_BTD = stack(x_BTD, positions_BT, segment_ids_BT, prefix_BT)
    x_BTD = make_norm(cfg, "final_norm")(x_BTD)
    if output == "hidden" and not self.is_initializing():  # init still makes an untied head
      return x_BTD
    if cfg.tie_embeddings:
      logits_BTV = embed.attend(x_BTD)
    else:
      logits_BTV = Linear((cfg.vocab_size,), ("embed", "vocab"), dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, init_std=cfg.init_std,
                          name="lm_head")(x_BTD)
    logits_BTV = nn.with_logical_constraint(logits_BTV.astype(jnp.float32),
                                            ("act_batch", "act_length", "act_vocab"))
    return {"logits": logits_BTV, "hidden": x_BTD, "both": (logits_BTV, x_BTD)}[output]
