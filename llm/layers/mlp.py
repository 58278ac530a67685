"""Position-wise feed-forward block: GELU / ReLU, or gated (SwiGLU, GeGLU)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.config import ModelConfig
from llm.layers.linear import Linear

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "swiglu": jax.nn.silu,
    "geglu": lambda x: jax.nn.gelu(x, approximate=True),
}
GATED = ("swiglu", "geglu")
FUSED_GATE_UP = "wi_gate_up"  # [gate | up] kernels side by side, (D, 2F)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.cfg
    proj = lambda features, axes, name: Linear(
        features, axes, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        init_std=cfg.init_std, name=name)
    act = ACTIVATIONS[cfg.activation]
    if cfg.activation in GATED and FUSED_GATE_UP in self.variables.get("params", {}):
      # fused for decoding (llm.inference.fuse_projections): one matmul, then split
      gate_BTF, up_BTF = jnp.split(
          proj((2 * cfg.d_ff,), ("embed", "mlp"), FUSED_GATE_UP)(x_BTD), 2, axis=-1)
      h_BTF = act(gate_BTF) * up_BTF
    elif cfg.activation in GATED:
      h_BTF = act(proj((cfg.d_ff,), ("embed", "mlp"), "wi_gate")(x_BTD))
      h_BTF = h_BTF * proj((cfg.d_ff,), ("embed", "mlp"), "wi_up")(x_BTD)
    else:
      h_BTF = act(proj((cfg.d_ff,), ("embed", "mlp"), "wi")(x_BTD))
    h_BTF = nn.with_logical_constraint(h_BTF, ("act_batch", "act_length", "act_mlp"))
    h_BTF = nn.Dropout(cfg.dropout)(h_BTF, deterministic=deterministic)
    return proj((cfg.d_model,), ("mlp", "embed"), "wo")(h_BTF)
