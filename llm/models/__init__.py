"""Model families: `build(cfg)` returns the Linen module for `cfg.family`."""

import flax.linen as nn

from llm.config import ModelConfig
from llm.models.decoder import Decoder


def build(cfg: ModelConfig) -> nn.Module:
  if cfg.family == "decoder":
    return Decoder(cfg)
  raise NotImplementedError(
      f"config.model.family={cfg.family!r} is not built yet; use 'decoder'")
