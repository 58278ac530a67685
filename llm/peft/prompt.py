"""Prompt tuning (Lester et al. 2021): n trainable virtual-token embeddings before the input.

Virtual tokens travel through the data and the KV cache as the negative ids -1..-n, so
batching, masks, positions, caching and every decoding strategy need nothing new: the
interceptor on the token embedding replaces the rows of negative ids by the trainable
`soft_prompt` (n, D), created beside the embedding table it extends.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm.config import ConfigError, ModelConfig, PeftConfig
from llm.models.blocks import Embed

TOKEN_EMBEDDING = "embed"  # the module name of every family's token embedding


def virtual_ids(n: int) -> list[int]:
  """The ids standing for the n virtual tokens, in order."""
  return [-1 - j for j in range(n)]


def interceptor(peft: PeftConfig, first_real_id: int = 5):
  """Replaces virtual-token rows of the token embedding by the soft prompt.

  `prompt_init="vocab"` starts each virtual token as the embedding of a random real
  token (ids >= first_real_id skip pad/eos/bos/unk/mask), which trains faster than
  random vectors (Lester et al.); `init_from_vocab` redoes it after a pretrained
  table is loaded.
  """
  n = peft.prompt_length

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, Embed) and context.method_name == "__call__"
            and module.name == TOKEN_EMBEDDING and not kwargs.get("attend", False)):
      return next_fun(*args, **kwargs)
    ids = args[0]
    x = next_fun(jnp.maximum(ids, 0), *args[1:], **kwargs)

    def init(rng, shape):
      if peft.prompt_init == "random":
        return nn.initializers.normal(0.02)(rng, shape, jnp.float32)
      rows = jax.random.randint(rng, (shape[0],), first_real_id, module.num_embeddings)
      table = nn.unbox(module.get_variable("params", "embedding"))
      return jnp.take(table, rows, axis=0).astype(jnp.float32)
    soft_ND = module.param("soft_prompt", nn.with_logical_partitioning(init, (None, "embed")),
                           (n, module.features))
    slot = jnp.clip(-ids - 1, 0, n - 1)
    return jnp.where((ids < 0)[..., None], jnp.take(soft_ND, slot, axis=0).astype(x.dtype), x)
  return intercept


def init_from_vocab(params: dict, peft: PeftConfig, seed: int, first_real_id: int = 5) -> dict:
  """Re-seeds the soft prompt from the (now pretrained) embedding table."""
  if peft.prompt_init != "vocab":
    return params
  table = params[TOKEN_EMBEDDING]["embedding"]
  rows = np.random.default_rng(seed).integers(first_real_id, table.shape[0], peft.prompt_length)
  soft = jnp.asarray(np.asarray(table)[rows], jnp.float32)
  return {**params, TOKEN_EMBEDDING: {**params[TOKEN_EMBEDDING], "soft_prompt": soft}}


VIRTUAL_TOKEN_METHODS = ("prompt", "prefix")  # prefix tuning reuses the virtual tokens


def num_virtual_tokens(peft: PeftConfig) -> int:
  """How many virtual tokens go before every input: prompt_length under prompt or prefix
  tuning, else 0."""
  return peft.prompt_length if peft.method in VIRTUAL_TOKEN_METHODS else 0


def model_prefix(cfg: ModelConfig) -> list[int]:
  """The ids every input of this model starts with: the virtual tokens under prompt or
  prefix tuning, else none. Generation and scoring put them before the prompt."""
  return virtual_ids(num_virtual_tokens(cfg.peft))


def with_virtual_tokens(batch: dict, cfg: ModelConfig) -> dict:
  """`batch` as the model expects it: virtual tokens first under prompt or prefix tuning."""
  if not num_virtual_tokens(cfg.peft):
    return batch
  return prepend_virtual_tokens(batch, cfg.peft.prompt_length, cfg)


def prepend_virtual_tokens(batch: dict, n: int, cfg: ModelConfig) -> dict:
  """Puts the n virtual tokens before every row of a batch (the encoder's input for an
  encoder-decoder); they carry no loss, and real tokens' positions move up by n."""
  if cfg.family == "encoder_decoder":
    keys = {"encoder_inputs": "ids", "encoder_segment_ids": "segments"}
  else:
    keys = {"inputs": "ids", "segment_ids": "segments", "positions": "positions",
            "targets": "zeros", "weights": "zeros", "prefix": "ones"}
  total = n + next(v.shape[1] for k, v in batch.items() if k in keys and v.ndim == 2)
  if cfg.positions == "learned" and total > cfg.max_len:
    raise ConfigError(f"model.peft.prompt_length={n} plus the input ({total - n} tokens) "
                      f"exceeds model.max_len={cfg.max_len}; shorten data.seq_len or the prompt")
  out = dict(batch)
  for key, kind in keys.items():
    if key not in batch:
      continue
    x = np.asarray(batch[key])
    rows = x.shape[0]
    if kind == "ids":
      head = np.broadcast_to(np.asarray(virtual_ids(n), x.dtype), (rows, n))
    elif kind == "segments":  # the virtual tokens belong to the row's first segment
      head = np.repeat(x[:, :1], n, axis=1)
    elif kind == "positions":
      head, x = np.broadcast_to(np.arange(n, dtype=x.dtype), (rows, n)), x + n
    elif kind == "ones":
      head = np.ones((rows, n), x.dtype)
    else:
      head = np.zeros((rows, n), x.dtype)
    out[key] = np.concatenate([head, x], axis=1)
  return out
