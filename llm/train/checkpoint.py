"""Orbax checkpoints of the train state and the data-iterator state.

Orbax writes each step to a temporary directory and renames it when complete, so a
run that dies mid-save leaves the previous checkpoint intact (and the next start
deletes the temporary directory). Restoring takes an abstract target whose leaves
carry shardings, so a checkpoint written on one mesh restores onto another; a
checkpoint that does not restore is skipped for the newest one that does.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp

from llm import config as config_lib
from llm.config import ConfigError
from llm.inference import quantize
from llm.train import safety

CONFIG_FILE = "config.json"
CORRUPT_DIR = "corrupt_checkpoints"  # checkpoints that failed to restore, kept for a look
log = logging.getLogger(__name__)


def manager(workdir: str, keep: int, async_save: bool = True,
            create: bool = True) -> ocp.CheckpointManager:
  """`create=False` for readers (load, generate): they neither create nor clean up."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=create, cleanup_tmp_directories=create,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "data"))


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def save(mgr: ocp.CheckpointManager, step: int, state_items: dict, data_state: dict,
         force: bool = False) -> None:
  with safety.disk_errors(f"saving checkpoint {step} in {mgr.directory}"):
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_items),
                                           data=ocp.args.JsonSave(data_state)), force=force)


def wait(mgr: ocp.CheckpointManager) -> None:
  """Blocks until the in-flight async save is committed (its errors surface here)."""
  with safety.disk_errors(f"saving a checkpoint in {mgr.directory}"):
    mgr.wait_until_finished()


def restore(mgr: ocp.CheckpointManager, abstract_items: dict, step: int):
  """(state_items, data_state) of `step`, placed per the shardings of `abstract_items`
  (a pytree of jax.ShapeDtypeStruct)."""
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_items), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def restore_latest(mgr: ocp.CheckpointManager, abstract_items: dict,
                   quarantine: str | None = None):
  """(state_items, data_state, step) of the newest checkpoint that restores cleanly.

  Each one that fails (truncated, corrupt, from another model) is reported and skipped;
  with `quarantine` (a training run's workdir) it is moved to `quarantine/corrupt_checkpoints`
  so the run can save that step again, and nothing is deleted. Raises ConfigError if none
  restores.
  """
  failures = []
  for step in sorted(mgr.all_steps(), reverse=True):
    try:
      items, data_state = restore(mgr, abstract_items, step)
    except Exception as e:  # orbax raises many types for a damaged directory
      reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      failures.append(f"step {step} ({reason})")
      log.warning("checkpoint %d does not restore, skipped: %s", step, reason)
      if quarantine is not None and jax.process_index() == 0:
        _move_aside(mgr, step, quarantine)
      continue
    if failures:
      log.warning("restored step %d after skipping %s", step, "; ".join(failures))
    return items, data_state, step
  raise ConfigError(f"no checkpoint in {mgr.directory} restores ({'; '.join(failures)}); "
                    "restore a backup or start a new --workdir")


def _move_aside(mgr: ocp.CheckpointManager, step: int, workdir: str) -> None:
  target = os.path.join(workdir, CORRUPT_DIR, f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.move(os.path.join(str(mgr.directory), str(step)), target)
  mgr.reload()


def abstract_with_shardings(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def check_writable(workdir: str) -> None:
  """Refuses a workdir that cannot be written, without creating anything."""
  if workdir.startswith(("gs://", "s3://")) or "://" in workdir:
    raise ConfigError(f"--workdir {workdir}: remote workdirs are not supported yet; train "
                      "into a local (or mounted) directory")
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir {workdir} cannot be written ({existing} is not a writable "
                      "directory); pick a directory you can write to")


# What a resumed run's data position and learning-rate schedule mean: changing one of
# these on resume silently trains on other data or another schedule.
RUN_FIELDS = ("train.steps", "train.warmup_steps", "data.batch_size", "data.seq_len",
              "data.source", "data.sources", "data.data_dir", "data.text_key", "data.encoding",
              "data.train_split",
              "data.tasks", "data.max_documents", "data.shuffle_seed", "data.objective",
              "data.streaming")


def check_config(workdir: str, cfg: config_lib.Config, resuming: bool) -> None:
  """Refuses a workdir made for another model, and (when resuming) a changed run field
  unless train.allow_config_change. Reads only: nothing is written before the run starts.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  saved = config_lib.to_dict(read_config(workdir))
  current = config_lib.to_dict(cfg)
  diffs = [f"model.{k}: {saved['model'][k]!r} in workdir vs {v!r} now"
           for k, v in current["model"].items() if saved["model"].get(k, v) != v]
  if diffs:
    raise ConfigError(f"--workdir {workdir} holds a checkpoint of a different model "
                      f"({'; '.join(diffs[:3])}); use a new --workdir or the same model config")
  changed = [f"{f}: {_field(saved, f)!r} -> {_field(current, f)!r}" for f in RUN_FIELDS
             if _field(saved, f) != _field(current, f)]
  if resuming and changed and not cfg.train.allow_config_change:
    raise ConfigError(f"resuming --workdir {workdir} with a changed {'; '.join(changed)}: the "
                      "data position and learning-rate schedule would mean something else; "
                      "pass --config.train.allow_config_change=True to resume anyway")


def _field(tree: dict, dotted: str):
  section, name = dotted.split(".")
  return tree[section].get(name)


def write_config(workdir: str, cfg: config_lib.Config) -> None:
  """Records the run's config atomically (a crash mid-write leaves the old one)."""
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with safety.disk_errors(f"writing {path}"):
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
