"""Trainable / frozen partition of a param tree by a regex over param paths (as
big_vision's frozen schedules): gradients and optimizer state cover only the trainable
part; the frozen part (a base model under LoRA, a reference policy, a teacher) is
passed to the loss as it is."""

from __future__ import annotations

import re

import jax
import numpy as np

from llm.config import ConfigError, PeftConfig

# What each method trains when config.train.trainable is left empty.
DEFAULT_TRAINABLE = {
    "full": r".*",
    "lora": r"(^|/)lora_[ab]$",
    "prompt": r"(^|/)soft_prompt$",
    "prefix": r"/(key|value)/prefix$",
    "adapter": r"(^|/)adapter_(down|up)$",
    "bitfit": r"(^|/)(bias|mlm_bias)$",
}


def trainable_pattern(peft: PeftConfig, override: str = "") -> str:
  return override or DEFAULT_TRAINABLE[peft.method]


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def split(params: dict, pattern: str, require: bool = True) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts holding the leaves whose path does / does
  not match `pattern` (re.search on "a/b/kernel"). Raises if nothing is trainable
  (unless `require` is False)."""
  regex = re.compile(pattern)

  def pick(tree, prefix, want):
    out = {}
    for key, value in tree.items():
      path = f"{prefix}/{key}" if prefix else str(key)
      if isinstance(value, dict):
        sub = pick(value, path, want)
        if sub:
          out[key] = sub
      elif bool(regex.search(path)) == want:
        out[key] = value
    return out
  trainable, frozen = pick(params, "", True), pick(params, "", False)
  if not trainable and require and "lora_" in pattern:
    modules = sorted({"/" + p.rsplit("/", 1)[0] for p in paths(params) if p.endswith("kernel")})
    raise ConfigError(f"config.model.peft.lora_targets matches no projection; module paths "
                      f"look like {', '.join(modules[:4])}, ...: fix the regex")
  if not trainable and require:
    raise ConfigError(f"config.train.trainable={pattern!r} matches no param (param paths look "
                      f"like {next(iter(paths(params)), '?')!r}); for bitfit the model needs "
                      "biases (model.use_bias=True)")
  return trainable, frozen


def merge(a: dict, b: dict) -> dict:
  """The union of two partitions of one tree."""
  out = dict(b)
  for key, value in a.items():
    out[key] = merge(value, b[key]) if isinstance(value, dict) and key in b else value
  return out


def paths(params: dict) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def count(params: dict) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
