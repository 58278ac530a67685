"""Model families: `build(cfg)` returns the Linen module for `cfg.family`;
`apply_batch` runs any family on a batch dict (the one place that knows each family's
positional inputs)."""

from __future__ import annotations

import flax.linen as nn

from llm.config import ModelConfig
from llm.layers.moe import STATS, collect_moe_stats
from llm.models.decoder import Decoder
from llm.models.encoder import Encoder, mean_pool
from llm.models.encoder_decoder import EncoderDecoder


FAMILIES = {"decoder": Decoder, "encoder": Encoder, "encoder_decoder": EncoderDecoder}


def build(cfg: ModelConfig, num_labels: int = 0) -> nn.Module:
  """The family's module; wrapped in `llm.peft.Adapted` when `cfg.peft.method` adds params
  (lora, prompt, adapter), which leaves the call signature and the base tree as they are."""
  from llm.peft.module import Adapted, needs_interception  # peft builds on the layers here
  kwargs = {"num_labels": num_labels} if cfg.family == "encoder" else {}
  if needs_interception(cfg):
    return Adapted(cfg, FAMILIES[cfg.family], tuple(sorted(kwargs.items())))
  return FAMILIES[cfg.family](cfg, **kwargs)


# Positional inputs of each family, by batch key (None: let the model default it).
_INPUTS = {
    "decoder": ("inputs", "positions", "segment_ids"),
    "encoder": ("inputs", "positions", "segment_ids"),
    "encoder_decoder": ("encoder_inputs", "inputs", "encoder_segment_ids", "positions",
                        "segment_ids"),
}


def batch_inputs(cfg: ModelConfig, batch: dict, init: bool = False) -> tuple:
  """The positional inputs of `cfg.family`'s __call__, taken from a batch dict.

  `init` keeps only the required leading tokens (what `module.init` needs)."""
  keys = _INPUTS[cfg.family]
  if init:
    keys = keys[:2] if cfg.family == "encoder_decoder" else keys[:1]
  return tuple(batch.get(k) for k in keys)


def apply_batch(module: nn.Module, params, batch: dict, rng=None, **kwargs):
  """(logits, aux) of `module` on `batch`: the one family-agnostic model call.

  `rng` None means deterministic (eval); otherwise it seeds dropout. `kwargs` go to the
  module (e.g. `prefix_BT` for a prefix LM, `output="mlm"` for an encoder). aux holds
  the already weighted MoE losses ("moe_aux_loss") and routing stats, or is empty.
  """
  cfg = module.cfg
  deterministic = rng is None
  rngs = None if deterministic else {"dropout": rng}
  logits, mutated = module.apply({"params": params}, *batch_inputs(cfg, batch),
                                 deterministic=deterministic, rngs=rngs, mutable=[STATS],
                                 **kwargs)
  stats = collect_moe_stats(mutated.get(STATS, {}))
  if not stats:
    return logits, {}
  return logits, {"moe_aux_loss": stats["aux_loss"],
                  "moe_dropped_fraction": stats["dropped_fraction"],
                  "moe_expert_load": stats["expert_load"]}


__all__ = ["Decoder", "Encoder", "EncoderDecoder", "FAMILIES", "apply_batch", "batch_inputs", "build",
           "mean_pool"]
