"""LayerNorm and RMSNorm, computed in float32 whatever the compute dtype."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.layers.common import dtype_of
from llm.layers.linear import logical_init


class Norm(nn.Module):
  kind: str = "layernorm"  # layernorm | rmsnorm
  eps: float = 1e-5
  use_bias: bool = True  # LayerNorm only
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    pdt = dtype_of(self.param_dtype)
    scale = self.param("scale", logical_init(nn.initializers.ones, ("embed",)), (d,), pdt)
    x32 = x.astype(jnp.float32)
    if self.kind == "rmsnorm":
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
      y = y * scale.astype(jnp.float32)
    else:
      mean = jnp.mean(x32, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
      y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)
      if self.use_bias:
        y = y + self.param("bias", logical_init(nn.initializers.zeros, ("embed",)), (d,),
                           pdt).astype(jnp.float32)
    return y.astype(dtype_of(self.dtype))
