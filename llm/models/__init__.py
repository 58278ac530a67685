"""Model families: `build(cfg)` returns the Linen module for `cfg.family`."""

from __future__ import annotations

import flax.linen as nn

from llm.config import ModelConfig
from llm.layers.moe import STATS, collect_moe_stats
from llm.models.decoder import Decoder
from llm.models.encoder import Encoder, mean_pool
from llm.models.encoder_decoder import EncoderDecoder


def build(cfg: ModelConfig, num_labels: int = 0) -> nn.Module:
  if cfg.family == "decoder":
    return Decoder(cfg)
  if cfg.family == "encoder":
    return Encoder(cfg, num_labels=num_labels)
  return EncoderDecoder(cfg)


def init_args(cfg: ModelConfig, batch: dict) -> tuple:
  """The positional inputs `module.init` needs for this family, taken from a batch."""
  if cfg.family == "encoder_decoder":
    return batch["encoder_inputs"], batch["inputs"]
  return (batch["inputs"],)


def make_forward(module: nn.Module):
  """(params, batch, rng|None) -> (logits_BTV, aux_losses): the train step's view of a model.

  aux_losses are already weighted (e.g. MoE load balancing + router z-loss).

  `rng` None means deterministic (eval); otherwise it seeds dropout.
  """
  cfg = module.cfg

  def forward(params, batch, rng):
    deterministic = rng is None or cfg.dropout == 0.0
    rngs = None if deterministic else {"dropout": rng}
    if cfg.family == "encoder_decoder":
      logits, mutated = module.apply(
          {"params": params}, batch["encoder_inputs"], batch["inputs"],
          batch["encoder_segment_ids"], batch.get("positions"), batch.get("segment_ids"),
          deterministic=deterministic, rngs=rngs, mutable=[STATS])
    else:
      extra = {"output": "mlm"} if cfg.family == "encoder" else (
          {"prefix_BT": batch["prefix"]} if "prefix" in batch else {})
      logits, mutated = module.apply(
          {"params": params}, batch["inputs"], batch.get("positions"), batch.get("segment_ids"),
          deterministic=deterministic, rngs=rngs, mutable=[STATS], **extra)
    stats = collect_moe_stats(mutated.get(STATS, {}))
    if not stats:
      return logits, {}
    return logits, {"moe_aux_loss": stats["aux_loss"],
                    "moe_dropped_fraction": stats["dropped_fraction"],
                    "moe_expert_load": stats["expert_load"]}
  return forward
