"""A worker process: claims trials from the study and runs each in its own workdir.

Trials run in-process through `llm.train.run` (the loop every training entry point
calls), so one worker imports jax once for all the trials it runs; with an entry point
(e.g. `experiments.lora`) each trial is that command in a subprocess. Either way a
trial's workdir is a normal training workdir: a rerun resumes from its checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback

from llm.sweep import results, study as study_lib

log = logging.getLogger("llm.sweep")
DEFINITION_FILE = "sweep.json"
ERROR_FILE = "error.txt"
LOG_FILE = "trial.log"
JAX_CACHE_DIR = ".jax_cache"


def read_definition(sweep_dir: str) -> dict | None:
  path = os.path.join(sweep_dir, DEFINITION_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_in_process(definition: dict, name: str, workdir: str) -> None:
  """Trains the trial's validated config with the train loop, in this process."""
  import jax

  from llm import config as config_lib, train
  if not jax.config.jax_compilation_cache_dir:
    # Compiled steps persist in the sweep directory: a resumed trial, and trials that
    # differ only in host-side fields (data seeds, sources), skip recompiling.
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.dirname(os.path.abspath(workdir)), JAX_CACHE_DIR))
  cfg = config_lib.from_configdict(definition["trials"][name]["config"])
  train.run(cfg, workdir, progress=False)


def run_entry_point(definition: dict, name: str, workdir: str) -> None:
  """`python -m ENTRY --config FILE:ARG --workdir DIR/name --config.k=v ...` (base then
  trial overrides); its output goes to DIR/name/trial.log."""
  fields = {**definition["base_overrides"], **definition["trials"][name]["overrides"]}
  command = [sys.executable, "-m", definition["entry_point"], "--config", definition["config"],
             "--workdir", workdir, *(f"--config.{k}={_flag(v)}" for k, v in fields.items())]
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOG_FILE), "a") as out:
    code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
  if code:
    with open(os.path.join(workdir, LOG_FILE)) as f:
      tail = [line.strip() for line in f if line.strip()][-1:] or ["(no output)"]
    raise RuntimeError(f"{definition['entry_point']} exited with {code}: {tail[0]}")


def _flag(value) -> str:
  return str(value).lower() if isinstance(value, bool) else str(value)


def _stop_on_signal(signum, frame):
  del frame
  # Later signals are ignored so the train loop's cleanup (its last checkpoint) completes.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  raise KeyboardInterrupt(f"signal {signum}")


def work(sweep_dir: str, storage_url: str, study_name: str, run_trial=None) -> int:
  """Runs trials until none is waiting; returns how many this worker ran."""
  handler = logging.StreamHandler(sys.stderr)  # this module's progress lines only
  handler.setFormatter(logging.Formatter("%(asctime)s sweep: %(message)s", "%H:%M:%S"))
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  signal.signal(signal.SIGTERM, _stop_on_signal)
  signal.signal(signal.SIGINT, _stop_on_signal)
  definition = read_definition(sweep_dir)
  if run_trial is None:
    run_trial = run_entry_point if definition["entry_point"] else run_in_process
  handle = study_lib.open_study(study_lib.open_storage(storage_url), study_name, {})
  count = 0
  while (claimed := study_lib.claim(handle, sweep_dir)) is not None:
    number, name = claimed
    workdir = os.path.join(sweep_dir, name)
    log.info("trial %s: started (optuna trial %d, pid %d)", name, number, os.getpid())
    start = time.time()
    results.record(workdir, name, "running", 0.0)
    try:
      with study_lib.heartbeat(handle, number):
        run_trial(definition, name, workdir)
    except KeyboardInterrupt:
      results.record(workdir, name, "interrupted", time.time() - start)
      study_lib.fail(handle, number, None)
      log.info("trial %s: interrupted; the next launch resumes it", name)
      return count
    except Exception as e:  # a failing trial is recorded; the others still run
      error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
      with open(os.path.join(workdir, ERROR_FILE), "w") as f:
        f.write(traceback.format_exc())
      results.record(workdir, name, "failed", time.time() - start, error)
      study_lib.fail(handle, number, error)
      log.info("trial %s: failed: %s", name, error)
      continue
    summary = results.summarize_workdir(workdir)
    results.record(workdir, name, "complete", time.time() - start)
    study_lib.finish(handle, number, summary.get("eval_loss", summary.get("train_loss")),
                     {k: summary[k] for k in ("step", "train_loss", "eval_loss") if k in summary})
    log.info("trial %s: done in %.0f s, eval loss %s", name, time.time() - start,
             summary.get("eval_loss"))
    count += 1
  return count
