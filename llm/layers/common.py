"""Small helpers shared by the layers."""

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name) -> jnp.dtype:
  return _DTYPES[name] if isinstance(name, str) else name
