"""Tiny configs and batches shared by the tests."""

import flax.linen as nn
import jax
import numpy as np

from llm import config as config_lib
from llm.models import build

GPT_TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=32)
LLAMA_TINY = dict(GPT_TINY, num_kv_heads=2, positions="rope", norm="rmsnorm",
                  activation="swiglu", use_bias=False, tie_embeddings=False)


def model_and_params(seed=0, **overrides):
  cfg = config_lib.model_from_dict(overrides)
  module = build(cfg)
  init = jax.jit(module.init)  # eager init dispatches op by op: many times slower on CPU
  params = nn.unbox(init(jax.random.PRNGKey(seed), np.ones((1, 8), np.int32))["params"])
  return JittedApply(module), params


class JittedApply:
  """The module with `apply` jitted (static flags by keyword), for fast tests."""

  def __init__(self, module):
    self.module, self.cfg = module, module.cfg
    self._apply = jax.jit(module.apply,
                          static_argnames=("decode", "deterministic", "mutable", "output"))

  def apply(self, *args, mutable=False, **kwargs):
    mutable = tuple(mutable) if isinstance(mutable, list) else mutable
    return self._apply(*args, mutable=mutable, **kwargs)

  def __getattr__(self, name):
    return getattr(self.module, name)


def random_batch(batch=8, seq_len=16, vocab=64, seed=0) -> dict:
  toks = np.random.default_rng(seed).integers(1, vocab, (batch, seq_len + 1)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "segment_ids": np.ones((batch, seq_len), np.int32),
          "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)),
          "weights": np.ones((batch, seq_len), np.float32)}
