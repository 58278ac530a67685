"""The adapted model: a base family module run under the PEFT method's interceptors.

`Adapted` shares its scope with the base module, so its param tree is the base tree
plus the method's own params (lora_a/b, soft_prompt, adapter_down/up) beside the
weights they adapt. It is a drop-in for the base module: same call signature, same
`encode` / `decode` for encoder-decoders, same `cfg`.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn

from llm.config import ModelConfig
from llm.peft import adapters, lora, prefix, prompt

INTERCEPTORS = {"lora": lora.interceptor, "prompt": prompt.interceptor,
                "prefix": prefix.interceptor, "adapter": adapters.interceptor}


def needs_interception(cfg: ModelConfig) -> bool:
  return cfg.peft.method in INTERCEPTORS


class Adapted(nn.Module):
  cfg: ModelConfig
  base_cls: type
  base_kwargs: tuple = ()  # sorted (name, value) pairs for the base module

  def setup(self):
    self.base = self.base_cls(self.cfg, **dict(self.base_kwargs))
    nn.share_scope(self, self.base)

  def _intercepted(self):
    if not needs_interception(self.cfg):
      return contextlib.nullcontext()
    return nn.intercept_methods(INTERCEPTORS[self.cfg.peft.method](self.cfg.peft))

  def __call__(self, *args, **kwargs):
    with self._intercepted():
      return self.base(*args, **kwargs)

  def encode(self, *args, **kwargs):
    with self._intercepted():
      return self.base.encode(*args, **kwargs)

  def decode(self, *args, **kwargs):
    with self._intercepted():
      return self.base.decode(*args, **kwargs)
