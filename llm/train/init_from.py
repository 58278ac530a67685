"""Starting a run from pretrained weights: a training workdir of ours, or a Hugging Face
checkpoint directory (`llm.convert.load_pretrained`), instead of random init."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from llm.config import Config, ConfigError, ModelConfig, PeftConfig
from llm.data.tokenizer import TOKENIZER_FILE
from llm.peft.lora import merge as merge_lora


def _kind(path: str) -> str:
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise ConfigError(f"config.train.init_from={path!r}: no config.json there; point it at a "
                      "training workdir or a Hugging Face checkpoint directory")
  with open(config_path) as f:
    saved = json.load(f)
  return "workdir" if "model" in saved and "train" in saved else "hf"


def pretrained(path: str, allow_pickle: bool = False) -> tuple[ModelConfig, dict, str | None]:
  """(model config, params on the host, tokenizer file or None) stored at `path`;
  `allow_pickle` lets a Hugging Face directory with only pytorch_model.bin load."""
  if _kind(path) == "workdir":
    from llm.train.loop import load  # the loop imports this module
    cfg, params, _ = load(path)
    model, params = _plain(cfg.model, jax.device_get(params), path)
    return model, params, os.path.join(path, TOKENIZER_FILE)
  from llm.convert import load_pretrained
  model_cfg, params = load_pretrained(path, allow_pickle=allow_pickle)
  return model_cfg, params, None


def _plain(model: ModelConfig, params: dict, path: str) -> tuple[ModelConfig, dict]:
  """A LoRA-tuned base is merged into plain weights; other adapted bases cannot be."""
  method = model.peft.method
  if method in ("full", "bitfit"):
    return model, params
  if method != "lora":
    raise ConfigError(f"config.train.init_from={path!r} is a {method}-tuned model, whose "
                      "extra params cannot be folded into the weights; start from its base")
  return dataclasses.replace(model, peft=PeftConfig()), merge_lora(params, model.peft)


def resolve(cfg: Config, base: ModelConfig, tokenizer_file: str | None) -> Config:
  """The run's config with the pretrained model's architecture; this run keeps its own
  adaptation method, dropout and remat. Refuses a model the objective cannot train."""
  from llm.objectives import OBJECTIVES
  families = OBJECTIVES[cfg.data.objective].families
  if base.family not in families:
    raise ConfigError(f"config.train.init_from={cfg.train.init_from!r} holds a {base.family} "
                      f"model, but config.data.objective={cfg.data.objective!r} trains "
                      f"{' or '.join(families)}; pick a matching objective or checkpoint")
  own = {k: getattr(cfg.model, k) for k in ("peft", "dropout", "remat")}
  model = dataclasses.replace(base, **own)
  data = cfg.data
  if tokenizer_file and not data.tokenizer_path:
    data = dataclasses.replace(data, tokenizer_path=tokenizer_file)
  return dataclasses.replace(cfg, model=model, data=data)


def overlay(fresh: dict, loaded: dict) -> dict:
  """`fresh` (an initialized tree, adapter params included) with every base param taken
  from `loaded`; each loaded param must exist in `fresh` with the same shape."""
  def walk(f, l, prefix):
    out = dict(f)
    for key, value in l.items():
      where = f"{prefix}/{key}" if prefix else key
      if key not in f:
        raise ConfigError(f"config.train.init_from: param {where} has no place in this model "
                          f"(it has {', '.join(sorted(f))[:200]})")
      if isinstance(value, dict):
        out[key] = walk(f[key], value, where)
      else:
        if tuple(np.shape(value)) != tuple(f[key].shape):
          raise ConfigError(f"config.train.init_from: param {where} has shape "
                            f"{np.shape(value)} there but {f[key].shape} here")
        out[key] = np.asarray(value, f[key].dtype)
    return out
  return walk(fresh, loaded, "")
