"""Prefix tuning (Li & Liang 2021): trainable keys and values per layer before the input.

It rides on prompt tuning's virtual tokens (ids -1..-n, put in front of every input by
`llm.peft.prompt.with_virtual_tokens`), so batching, masks, positions, the KV cache and
every decoding strategy need nothing new; only what attention sees at those positions
changes. The interceptor

- looks the virtual ids up as fixed stand-in real tokens (`stand_in_ids`), and records
  where the virtual tokens are;
- replaces the output of every self-attention's `key` and `value` projection at those
  positions by the trainable `prefix` (n, K, H) created beside that projection's kernel
  (one per layer; stacked along "layers" under scan).

Real tokens attend to the virtual positions' keys and values only, and those are the
params, so this is exactly prefix tuning: what the model computes at the virtual
positions otherwise feeds only their own outputs, which carry no loss. Under RoPE the
prefix keys are rotated by the virtual positions 0..n-1, an invertible reparametrisation.
Decoder-only: in an encoder the virtual positions' outputs reach the other tokens.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm.config import PeftConfig
from llm.layers.attention import Attention
from llm.layers.linear import Linear
from llm.models.blocks import Embed

TOKEN_EMBEDDING = "embed"
_PROJECTIONS = ("key", "value")


def stand_in_ids(n: int, vocab_size: int, first_real_id: int = 5) -> np.ndarray:
  """The real tokens the n virtual tokens are looked up as (fixed, seed 0): the prefix
  starts as the keys and values the base model computes for them (`init_from_base`)."""
  return np.random.default_rng(0).integers(first_real_id, vocab_size, n).astype(np.int32)


def _is_token_lookup(module, method_name, kwargs) -> bool:
  return (isinstance(module, Embed) and method_name == "__call__"
          and module.name == TOKEN_EMBEDDING and not kwargs.get("attend", False))


def _is_self_attention_kv(module, method_name) -> bool:
  return (isinstance(module, Linear) and method_name == "__call__"
          and module.name in _PROJECTIONS and isinstance(module.parent, Attention))


def interceptor(peft: PeftConfig):
  """A `nn.intercept_methods` interceptor for prefix tuning (made afresh per model call:
  it carries the virtual-token slots from the token lookup to the attention layers)."""
  n = peft.prompt_length
  seen: dict = {}  # slot_BT (j for virtual token -1-j, else -1) of the latest lookup

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if _is_token_lookup(module, context.method_name, kwargs):
      ids = args[0]
      seen["slot_BT"] = jnp.where(ids < 0, -ids - 1, -1)
      stand_in = jnp.asarray(stand_in_ids(n, module.num_embeddings))
      real = jnp.where(ids < 0, stand_in[jnp.clip(-ids - 1, 0, n - 1)], ids)
      return next_fun(real, *args[1:], **kwargs)
    y_BTKH = next_fun(*args, **kwargs)
    if not _is_self_attention_kv(module, context.method_name) or "slot_BT" not in seen:
      return y_BTKH
    slot_BT = seen["slot_BT"]
    onehot_BTN = (slot_BT[..., None] == jnp.arange(n)).astype(jnp.float32)

    def init(rng, shape):
      # "vocab": what the base projects at the virtual positions of row 0 (the stand-in
      # tokens' keys / values); "random", or an input without virtual tokens: noise of
      # the projection's scale.
      noise = jax.random.normal(rng, shape) * jnp.std(y_BTKH.astype(jnp.float32))
      if peft.prompt_init == "random":
        return noise
      found = jnp.einsum("tn,tkh->nkh", onehot_BTN[0], y_BTKH[0].astype(jnp.float32))
      return jnp.where(onehot_BTN[0].sum(0).min() > 0, found, noise)
    prefix_NKH = module.param(
        "prefix", nn.with_logical_partitioning(init, (None, *module.axes[1:])),
        (n, *y_BTKH.shape[2:]))
    virtual_BT11 = (slot_BT >= 0)[..., None, None]
    picked_BTKH = jnp.take(prefix_NKH, jnp.clip(slot_BT, 0, n - 1), axis=0)
    return jnp.where(virtual_BT11, picked_BTKH.astype(y_BTKH.dtype), y_BTKH)
  return intercept


def _without_prefix(tree):
  if not isinstance(tree, dict):
    return tree
  return {k: _without_prefix(v) for k, v in tree.items() if k != "prefix"}


def init_from_base(module: nn.Module, params: dict, seed: int) -> dict:
  """`params` with every prefix recomputed from the (now pretrained) base: the keys and
  values the base model gives the stand-in tokens, so training starts at the base model
  conditioned on them (the "vocab" init; "random" redraws noise of the new scale)."""
  ids_1N = jnp.asarray([[-1 - j for j in range(module.cfg.peft.prompt_length)]], jnp.int32)

  @jax.jit
  def fill(base):
    _, variables = module.apply({"params": base}, ids_1N, mutable=["params"],
                                rngs={"params": jax.random.PRNGKey(seed)})
    return nn.unbox(variables["params"])
  return jax.device_get(fill(_without_prefix(params)))
