"""Prefix tuning (Li & Liang 2021): trainable keys and values per layer before the input.

It rides on prompt tuning's virtual tokens (ids -1..-n, put in front of every input by
`llm.peft.prompt.with_virtual_tokens`; the encoder's input for an encoder-decoder), so
batching, masks, positions, the KV cache and every decoding strategy need nothing new;
only what attention sees at those positions changes. The interceptor

- looks the virtual ids up as fixed stand-in real tokens (`stand_in_ids`), and records
  where the virtual tokens are;
- replaces the output of every `key` and `value` projection that real tokens read the
  virtual positions through by the trainable `prefix` (n, K, H) created beside that
  projection's kernel (one per layer; stacked along "layers" under scan).

Decoder-only: the self-attention's. Real tokens attend to the virtual positions' keys
and values only, and those are the params, so this is exactly prefix tuning: what the
model computes at the virtual positions otherwise feeds only their own outputs, which
carry no loss. Under RoPE the prefix keys are rotated by the virtual positions 0..n-1,
an invertible reparametrisation.

Encoder-decoder: the encoder self-attention's (as above) and the cross-attention's at
the same encoder positions. The encoder output at the virtual positions depends on the
real tokens (attention there is bidirectional), so the decoder must not read it: its
cross-attention keys and values at those positions are params too. The cross-attention
sees the encoder output, not its ids (generation encodes once, then fills the cross
cache on the first decode call), so here the virtual positions are the encoder input's
first n, where `with_virtual_tokens` and `model_prefix` put them; the encoder
self-attention uses the same rule. The decoder's self-attention gets no prefix (Li &
Liang give BART's decoder one too): every decoder layer already reads n trainable
key/value pairs through its cross-attention, and a self-attention prefix would need
virtual tokens before the decoder's input too, so in every training batch, in the
decoder's cache and before `start_id` in every decoding path.

Encoder-only families are refused (llm/config.py): their heads read the virtual
positions' outputs (the pooled [CLS] head reads position 0), which depend on the real
tokens.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm.config import PeftConfig
from llm.layers.attention import Attention, CrossAttention
from llm.layers.linear import Linear
from llm.models.blocks import Embed
from llm.models.encoder_decoder import Stack

TOKEN_EMBEDDING = "embed"
_PROJECTIONS = ("key", "value")


def stand_in_ids(n: int, vocab_size: int, first_real_id: int = 5) -> np.ndarray:
  """The real tokens the n virtual tokens are looked up as (fixed, seed 0): the prefix
  starts as the keys and values the base model computes for them (`init_from_base`)."""
  return np.random.default_rng(0).integers(first_real_id, vocab_size, n).astype(np.int32)


def _is_token_lookup(module, method_name, kwargs) -> bool:
  return (isinstance(module, Embed) and method_name == "__call__"
          and module.name == TOKEN_EMBEDDING and not kwargs.get("attend", False))


def _prefix_rule(module, method_name, seen: dict):
  """How the virtual positions of a key / value projection that gets a prefix are found
  ("ids": from the latest token lookup; "first_n": the encoder input's first n), or None
  for every other call. `seen["stack"]` names the encoder-decoder stack being run."""
  if not (isinstance(module, Linear) and method_name == "__call__"
          and module.name in _PROJECTIONS):
    return None
  stack = seen.get("stack")
  if isinstance(module.parent, CrossAttention):
    return "first_n"
  if not isinstance(module.parent, Attention) or stack == "decoder":
    return None  # an encoder-decoder's decoder self-attention keeps its keys and values
  if stack == "encoder":
    return "first_n"
  return "ids" if "slot_BT" in seen else None  # decoder-only


def interceptor(peft: PeftConfig):
  """A `nn.intercept_methods` interceptor for prefix tuning (made afresh per model call:
  it carries the virtual-token slots from the token lookup to the attention layers)."""
  n = peft.prompt_length
  seen: dict = {}  # slot_BT of the latest lookup; the encoder-decoder stack being run

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, Stack) and context.method_name == "__call__":
      seen["stack"] = "decoder" if module.is_decoder else "encoder"
      try:
        return next_fun(*args, **kwargs)
      finally:
        del seen["stack"]
    if _is_token_lookup(module, context.method_name, kwargs):
      ids = args[0]
      seen["slot_BT"] = jnp.where(ids < 0, -ids - 1, -1)
      stand_in = jnp.asarray(stand_in_ids(n, module.num_embeddings))
      real = jnp.where(ids < 0, stand_in[jnp.clip(-ids - 1, 0, n - 1)], ids)
      return next_fun(real, *args[1:], **kwargs)
    y_BTKH = next_fun(*args, **kwargs)
    rule = _prefix_rule(module, context.method_name, seen)
    if rule is None:
      return y_BTKH
    if rule == "ids":
      slot_BT = seen["slot_BT"]
    else:
      positions_1T = jnp.arange(y_BTKH.shape[1])[None]
      slot_BT = jnp.where(positions_1T < n, positions_1T, -1)
    onehot_BTN = (slot_BT[..., None] == jnp.arange(n)).astype(jnp.float32)

    def init(rng, shape):
      # "vocab": what the base projects at the virtual positions of row 0 (the stand-in
      # tokens' keys / values); "random", or an input without them: noise of the
      # projection's scale.
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
  values the base model gives the stand-in tokens (an encoder-decoder: encoded alone), so
  training starts at the base model conditioned on them (the "vocab" init; "random"
  redraws noise of the new scale)."""
  ids_1N = jnp.asarray([[-1 - j for j in range(module.cfg.peft.prompt_length)]], jnp.int32)
  inputs = (ids_1N,)  # an encoder-decoder: the encoder reads them; one decoder token
  if module.cfg.family == "encoder_decoder":
    inputs = (ids_1N, jnp.zeros((1, 1), jnp.int32))

  @jax.jit
  def fill(base):
    _, variables = module.apply({"params": base}, *inputs, mutable=["params"],
                                rngs={"params": jax.random.PRNGKey(seed)})
    return nn.unbox(variables["params"])
  return jax.device_get(fill(_without_prefix(params)))
