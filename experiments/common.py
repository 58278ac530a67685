"""Shared flag handling for the entry points: one-line errors instead of tracebacks."""

import functools
import os
import sys

from absl import flags

from llm.config import ConfigError

# A multi-process job (see README "Multi-host"): these, else the JAX_* environment
# variables; under SLURM, Open MPI or on a TPU pod slice jax finds them itself.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the job (JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process, 0 .. num_processes - 1 (JAX_PROCESS_ID).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 30, "A process silent this long "
                                  "counts as dead, and the others exit.")


def one_line_errors(main):
  """Prints ConfigError / ValueError as `error: ...` and exits 2, as users expect of a CLI;
  a preempted run exits with safety.PREEMPTED_EXIT_CODE, a diverged or disk-full one 1."""
  import errno

  from llm.train import safety

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except (ConfigError, ValueError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except safety.Preempted as e:
      print(f"stopped: {e}", file=sys.stderr)
      sys.exit(safety.PREEMPTED_EXIT_CODE)
    except (safety.NonFiniteError, OSError) as e:
      if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    except Exception as e:  # noqa: BLE001 -- only a multi-process job's lost peer is ours
      lost_peer(e)
      raise
  return wrapped


def lost_peer(error: Exception) -> None:
  """In a multi-process job a runtime error in a collective means a peer died (or its
  host went away): say so in one line and exit at once, skipping jax.distributed's
  shutdown barrier, which would wait minutes for the dead process."""
  import jax
  if not isinstance(error, jax.errors.JaxRuntimeError) or jax.process_count() == 1:
    return
  first = str(error).strip().splitlines()[0][:300]
  print(f"error: process {jax.process_index()} of {jax.process_count()} lost a peer ({first});"
        " another process of the job most likely died, see its log; restart the whole job "
        "to resume from the last checkpoint", file=sys.stderr, flush=True)
  os._exit(1)


def start(config_dict):
  """The start of every training entry point: quiet logs, join a multi-host job if the
  flags or the environment describe one, and validate the config at the boundary."""
  from absl import logging

  from llm import config as config_lib
  from llm import parallel
  logging.set_verbosity(logging.WARNING)
  parallel.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                            _HEARTBEAT.value)
  return config_lib.from_configdict(config_dict)


def finetune(config_dict, workdir: str, methods: tuple[str, ...], entry_point: str):
  """Trains `config_dict` (an sft run from train.init_from), then scores the tasks' test
  split and prints one JSON line: losses, task metrics, trainable / total params."""
  import json

  from llm import peft, train
  from llm.eval.report import evaluate_model
  cfg = start(config_dict)
  if cfg.model.peft.method not in methods:
    raise ConfigError(f"config.model.peft.method={cfg.model.peft.method!r}: {entry_point} "
                      f"trains {' / '.join(methods)}; use the entry point for that method")
  last = train.run(cfg, workdir)
  cfg, params, tokenizer = train.load(workdir)
  pattern = peft.trainable_pattern(cfg.model.peft, cfg.train.trainable)
  trainable = peft.count(peft.split(params, pattern)[0])
  scores = evaluate_model(cfg, params, tokenizer, cfg.data.tasks, lm_source=None)["tasks"]
  print(json.dumps({"method": cfg.model.peft.method, "step": last.get("step"),
                    "train_loss": last.get("train_loss"), "eval_loss": last.get("eval_loss"),
                    "test": {task: by_k[0] for task, by_k in scores.items()},
                    "trainable_params": trainable, "total_params": peft.count(params),
                    "trainable_percent": 100.0 * trainable / peft.count(params)}))


def finetune_app(default_config: str, methods: tuple[str, ...], entry_point: str):
  """Defines --config / --workdir and runs `finetune` as an absl app (one per method)."""
  from absl import app, flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file("config", default_config, "Experiment config.")
  workdir = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, adapter go here.",
                                required=True)

  @one_line_errors
  def main(argv):
    del argv
    finetune(config.value, workdir.value, methods, entry_point)
  app.run(main)
