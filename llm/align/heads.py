"""A decoder with a scalar head on its final hidden states: the reward model (read at
each row's last real token) and a PPO policy's value head (read at every position).

The head shares the decoder's scope, so the tree is the decoder's own (adapter params
included) plus one `{name}` entry: pretrained weights overlay it unchanged, and a
trainable regex can pick the head out (`^reward_head/`, `^value_head/`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.config import ModelConfig
from llm.layers.linear import Linear

REWARD_HEAD, VALUE_HEAD = "reward_head", "value_head"


class ScalarHead(nn.Module):
  """tokens (B, T) -> scalars (B, T) (and the logits (B, T, V) with `with_logits`)."""

  cfg: ModelConfig
  head: str = REWARD_HEAD

  def setup(self):
    from llm.models import build  # models build on the layers this package also uses
    self.backbone = build(self.cfg)
    nn.share_scope(self, self.backbone)
    setattr(self, self.head, Linear((1,), ("embed", None), use_bias=True, dtype=self.cfg.dtype,
                                    param_dtype=self.cfg.param_dtype, init_std=self.cfg.init_std))

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, deterministic=True,
               with_logits: bool = False):
    output = "both" if with_logits or self.is_initializing() else "hidden"
    out = self.backbone(tokens_BT, positions_BT, segment_ids_BT, deterministic=deterministic,
                    output=output)
    logits_BTV, hidden_BTD = out if output == "both" else (None, out)
    scalars_BT = getattr(self, self.head)(hidden_BTD)[..., 0].astype(jnp.float32)
    return (logits_BTV, scalars_BT) if with_logits else scalars_BT


def last_token(values_BT: jax.Array, segment_ids_BT: jax.Array) -> jax.Array:
  """(B,) each row's value at its last real token (right-padded rows, segment 0 = pad)."""
  last_B = jnp.maximum(jnp.sum(segment_ids_BT > 0, axis=1) - 1, 0)
  return jnp.take_along_axis(values_BT, last_B[:, None], axis=1)[:, 0]
