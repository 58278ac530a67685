"""Bottleneck adapters (Houlsby et al. 2019): h + up(gelu(down(h))) on the output of every
attention and MLP sublayer, before the residual add; `up` starts at zero, so the
adapted model starts as the base model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.config import PeftConfig
from llm.layers.attention import Attention, CrossAttention
from llm.layers.linear import contract_last, dot, logical_init
from llm.layers.mlp import MLP
from llm.layers.moe import MoE

_SUBLAYERS = (Attention, CrossAttention, MLP, MoE)


def interceptor(peft: PeftConfig):
  def intercept(next_fun, args, kwargs, context):
    h = next_fun(*args, **kwargs)
    module = context.module
    if not (isinstance(module, _SUBLAYERS) and context.method_name == "__call__"):
      return h
    d, a = h.shape[-1], peft.adapter_dim
    down = module.param("adapter_down", logical_init(nn.initializers.normal(d ** -0.5),
                                                     ("embed", None)), (d, a), jnp.float32)
    up = module.param("adapter_up", logical_init(nn.initializers.zeros, (None, "embed")),
                      (a, d), jnp.float32)
    z = jax.nn.gelu(dot(h, down, contract_last(h.ndim, 1), module.cfg.dtype))
    return h + dot(z, up, contract_last(z.ndim, 1), module.cfg.dtype).astype(h.dtype)
  return intercept
