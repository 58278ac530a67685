"""Sweep definitions: trials as dicts of config overrides, their names, and validation.

A sweep config file (`configs/sweeps/*.py`) has `get_config(arg)` (the base ConfigDict,
as every experiment file) and `get_sweep(arg)` returning the trials, built with the
helpers below in the spirit of T5X's `hyper` and big_vision's sweeps:

  product(sweep("model.num_layers", [2, 4]), sweep("train.learning_rate", [1e-3, 3e-3]))

A trial is a dict such as {"model.num_layers": 4, "train.learning_rate": 3e-4}. Keys
under `tag.` are not config fields: they label a trial (e.g. `tag.budget` of an IsoFLOP
study) and become columns of the report. `name` sets the trial's name; otherwise it is
made from the overrides, so it is stable across runs and readable in `ls`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import itertools
import json
import os
import re
from typing import Any, Iterable, Sequence

from llm import config as config_lib
from llm.config import ConfigError

TAG = "tag."
NAME = "name"
_MAX_NAME = 96  # longer names are cut and suffixed with a hash, so they stay unique


def sweep(key: str, values: Iterable[Any]) -> list[dict]:
  """One field over `values`: [{key: v} for v in values]."""
  return [{key: v} for v in values]


def product(*groups: Sequence[dict]) -> list[dict]:
  """Every combination of one trial from each group (the last group varies fastest)."""
  return [_merge(parts) for parts in itertools.product(*groups)]


def zipit(*groups: Sequence[dict]) -> list[dict]:
  """The i-th trials of all groups merged; the groups must have equal lengths."""
  lengths = {len(g) for g in groups}
  if len(lengths) > 1:
    raise ValueError(f"zipit: groups have different lengths {sorted(lengths)}; give each "
                     "group the same number of trials")
  return [_merge(parts) for parts in zip(*groups)]


def chain(*groups: Sequence[dict]) -> list[dict]:
  """The groups' trials one after another (e.g. two sub-grids in one sweep)."""
  return [dict(t) for g in groups for t in g]


def _merge(parts: Sequence[dict]) -> dict:
  merged: dict = {}
  for part in parts:
    clash = set(merged) & set(part)
    if clash:
      raise ValueError(f"sweep: field {sorted(clash)[0]!r} is set by two combined groups; "
                       "set each field in one group only")
    merged.update(part)
  return merged


def format_value(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def trial_name(trial: dict) -> str:
  """`name` if given, else `field=value` pairs joined by commas (last key part only, unless
  that is ambiguous within the trial), filesystem-safe."""
  if NAME in trial:
    return str(trial[NAME])
  keys = [k for k in trial if k != NAME]
  short = [k.split(".")[-1] for k in keys]
  labels = [s if short.count(s) == 1 else k for s, k in zip(short, keys)]
  name = ",".join(f"{label}={format_value(trial[k])}" for label, k in zip(labels, keys))
  name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name) or "default"
  if len(name) > _MAX_NAME:
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    name = f"{name[:_MAX_NAME - 9]}~{digest}"
  return name


def overrides(trial: dict) -> dict:
  """The config fields a trial sets (without its name and tags)."""
  return {k: v for k, v in trial.items() if k != NAME and not k.startswith(TAG)}


def tags(trial: dict) -> dict:
  return {k[len(TAG):]: v for k, v in trial.items() if k.startswith(TAG)}


def apply_overrides(base, fields: dict):
  """A copy of ConfigDict `base` with dotted `fields` set; unknown fields fail by name."""
  cd = copy.deepcopy(base)
  for key, value in fields.items():
    *path, leaf = key.split(".")
    group = cd
    for depth, part in enumerate(path):
      if part not in group:
        raise ConfigError(f"config.{'.'.join(path[:depth + 1])}: unknown section; valid: "
                          f"{', '.join(sorted(group.keys()))}")
      group = group[part]
    if not hasattr(group, "keys") or leaf not in group:
      valid = ", ".join(sorted(group.keys())) if hasattr(group, "keys") else "none"
      raise ConfigError(f"config.{key}: unknown field; valid fields: {valid}")
    try:
      group[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.{key}={value!r}: {e}") from None
  return cd


def expand(base, trials: Sequence[dict]) -> dict[str, dict]:
  """{name: {"overrides", "tags", "config"}} for every trial, each config validated in full
  (llm.config), so a typo in the last trial fails before the first one starts."""
  if not trials:
    raise ValueError("the sweep has no trials: get_sweep(arg) returned an empty list; "
                     "check the arg and the sweep helpers")
  out: dict[str, dict] = {}
  for index, trial in enumerate(trials):
    if not isinstance(trial, dict):
      raise ValueError(f"sweep trial {index}: expected a dict of overrides, got {trial!r}")
    name = trial_name(trial)
    if name in out:
      raise ValueError(f"sweep trials {list(out).index(name)} and {index} have the same name "
                       f"{name!r}; make their overrides differ or give each a distinct 'name'")
    if name in (".", "..") or "/" in name:
      raise ValueError(f"sweep trial {index}: name {name!r} is not a directory name")
    try:
      cd = apply_overrides(base, overrides(trial))
      cfg = config_lib.from_configdict(cd)
    except ConfigError as e:
      raise ConfigError(f"sweep trial {name!r}: {e}") from None
    out[name] = {"overrides": overrides(trial), "tags": tags(trial),
                 "config": config_lib.to_dict(cfg)}
  return out


def load_sweep_file(spec: str) -> tuple[Any, list[dict], str, str]:
  """`path.py[:arg]` -> (base ConfigDict, trials, path, arg) from the file's get_config and
  get_sweep."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {spec}: no such file {path!r}")
  module_spec = importlib.util.spec_from_file_location("_sweep_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  for function in ("get_config", "get_sweep"):
    if not hasattr(module, function):
      raise ValueError(f"--config {spec}: {path} defines no {function}(arg); a sweep file "
                       "defines get_config(arg) (the base config) and get_sweep(arg) (trials)")
  return module.get_config(arg), list(module.get_sweep(arg)), path, arg


def fingerprint(definition: dict) -> str:
  """A hash of what a sweep runs: each trial's full config, tags and the entry point."""
  blob = json.dumps(definition, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]
