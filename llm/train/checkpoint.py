"""Orbax checkpoints of the train state and the data-iterator state.

Orbax writes each step to a temporary directory and renames it when complete, so a
run that dies mid-save leaves the previous checkpoint intact. Restoring takes an
abstract target whose leaves carry shardings, so a checkpoint written on one mesh
restores onto another.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from llm import config as config_lib
from llm.config import ConfigError
from llm.inference import quantize

CONFIG_FILE = "config.json"


def manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "data"))


def save(mgr: ocp.CheckpointManager, step: int, state_items: dict, data_state: dict,
         force: bool = False) -> None:
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_items),
                                         data=ocp.args.JsonSave(data_state)), force=force)


def restore(mgr: ocp.CheckpointManager, abstract_items: dict, step: int | None = None):
  """Returns (state_items, data_state) of `step` (default: latest), placed per the
  shardings of `abstract_items` (a pytree of jax.ShapeDtypeStruct)."""
  step = mgr.latest_step() if step is None else step
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_items), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def abstract_with_shardings(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def ensure_writable(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir {workdir} cannot be written ({e.strerror}); "
                      "pick a directory you can write to") from None


def write_or_check_config(workdir: str, cfg: config_lib.Config) -> None:
  """Records the run's config; refuses to reuse a workdir made for another model.

  Training fields may change between resumptions (e.g. more steps), the model may not:
  its checkpoint would not fit.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    saved = _saved_config(workdir)
    current = config_lib.to_dict(cfg.model)
    diffs = [f"model.{k}: {saved['model'][k]!r} in workdir vs {v!r} now"
             for k, v in current.items() if k in saved["model"] and saved["model"][k] != v]
    if diffs:
      raise ConfigError(f"--workdir {workdir} holds a checkpoint of a different model "
                        f"({'; '.join(diffs[:3])}); use a new --workdir or the same model config")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config_lib.to_json(cfg))
  os.replace(tmp, path)


def read_config(workdir: str) -> config_lib.Config:
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(os.path.join(workdir, quantize.MANIFEST)):
    raise ConfigError(f"--workdir {workdir} holds a quantized checkpoint, not a training "
                      "workdir; restore it with llm.inference.quantize.restore (experiments."
                      "quantized_inference --from_quantized) or pass the workdir it came from")
  if not os.path.exists(path):
    raise ConfigError(f"--workdir {workdir} has no {CONFIG_FILE}; train into it first "
                      "(python -m experiments.pretrain_clm --workdir ...)")
  saved = _saved_config(workdir)
  try:
    return config_lib.from_configdict(saved)
  except ConfigError as e:
    raise ConfigError(f"--workdir {workdir}: its {CONFIG_FILE} does not fit this version of "
                      f"the code ({e})") from None


def _saved_config(workdir: str) -> dict:
  """The workdir's config.json as a dict; a one-line error when it is not one we wrote."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE), encoding="utf-8") as f:
      saved = json.load(f)
    ours = isinstance(saved, dict) and isinstance(saved["model"] if "model" in saved else 0, dict)
    why = "" if ours else "no model section"
  except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
    why = str(e)
  if why:
    raise ConfigError(f"--workdir {workdir}: its {CONFIG_FILE} is not a training config "
                      f"({why[:120]}); use a new --workdir (a Hugging Face checkpoint "
                      "directory goes in --config.train.init_from)")
  return saved
