"""Adapters saved and loaded on their own: the trainable params (a few MB) in
safetensors, with the base model's config and a fingerprint of its weights, so an
adapter is never applied to a base it was not trained on."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from llm.config import ConfigError, ModelConfig, PeftConfig, to_dict
from llm.peft.partition import merge, path_str, split

WEIGHTS, META = "adapter.safetensors", "adapter.json"


def fingerprint(base_params: dict) -> str:
  """sha256 over every frozen leaf's path, shape and leading bytes (64 KiB): cheap even
  for large models, and it changes when the base weights do."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(base_params),
                           key=lambda pl: path_str(pl[0])):
    arr = np.asarray(leaf)
    h.update(f"{path_str(path)}:{arr.shape}:{arr.dtype}".encode())
    h.update(arr.reshape(-1)[:16384].tobytes())
  return h.hexdigest()


def _base_config(cfg: ModelConfig) -> dict:
  return to_dict(dataclasses.replace(cfg, peft=PeftConfig()))


def save_adapter(path: str, cfg: ModelConfig, trainable: dict, frozen: dict,
                 pattern: str) -> None:
  """Writes the `trainable` params (matched by `pattern`) and what identifies the base."""
  os.makedirs(path, exist_ok=True)
  flat = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(trainable)}
  save_file(flat, os.path.join(path, WEIGHTS))
  meta = {"peft": to_dict(cfg.peft), "trainable": pattern, "base_model": _base_config(cfg),
          "base_fingerprint": fingerprint(frozen)}
  with open(os.path.join(path, META), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)


def load_adapter(path: str, cfg: ModelConfig, base_params: dict) -> tuple[ModelConfig, dict]:
  """(cfg with the adapter's peft settings, base_params with the adapter's params in
  place), after checking that it belongs to this base (`cfg`'s model and weights)."""
  meta_path = os.path.join(path, META)
  if not os.path.exists(meta_path):
    raise ConfigError(f"--adapter {path}: no {META} there; point it at a directory written by "
                      "a LoRA / prompt-tuning / adapter run (its workdir's adapter/)")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta["base_model"] != _base_config(cfg):
    diffs = [k for k, v in _base_config(cfg).items() if meta["base_model"].get(k) != v]
    raise ConfigError(f"--adapter {path} was trained on a different base model (differs in "
                      f"model.{', model.'.join(diffs[:3])}); use the base it was trained on")
  if meta["base_fingerprint"] != fingerprint(split(base_params, meta["trainable"], False)[1]):
    raise ConfigError(f"--adapter {path} was trained on different base weights (fingerprint "
                      "mismatch); load the checkpoint it was trained from")
  peft = PeftConfig(**meta["peft"])
  tree: dict = {}
  for key, value in load_file(os.path.join(path, WEIGHTS)).items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return dataclasses.replace(cfg, peft=peft), merge(tree, base_params)
