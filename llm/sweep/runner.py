"""The launcher: validate every trial, record the sweep, queue what is due, run workers.

`prepare` checks all trials' configs before anything runs and writes DIR/sweep.json
(refusing a DIR that holds another sweep); `launch` queues the trials that are not done
in the study and runs `workers` local worker processes until the queue is empty.
Launching the same command on several machines against one `--storage` database adds
their workers to the same queue.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal

from llm.sweep import spec as spec_lib, study as study_lib, worker as worker_lib

JOIN_TIMEOUT_S = 300  # after a stop signal: time for in-flight checkpoints to finish


def prepare(config_spec: str, base, trials: list[dict], sweep_dir: str,
            base_overrides: dict, entry_point: str = "") -> dict:
  """Validates every trial's full config, then writes DIR/sweep.json. A DIR holding a
  sweep may gain trials; one whose trials differ from these is refused."""
  expanded = spec_lib.expand(base, trials)
  for trial in expanded.values():
    trial["hash"] = spec_lib.fingerprint({"entry_point": entry_point, **trial})
  definition = {"config": config_spec, "entry_point": entry_point,
                "base_overrides": dict(base_overrides), "trials": expanded}
  existing = worker_lib.read_definition(sweep_dir)
  if existing is not None:
    old = existing["trials"]
    changed = [n for n in old if n not in expanded or old[n]["hash"] != expanded[n]["hash"]]
    if changed:
      why = "is not in this sweep" if changed[0] not in expanded else "is defined differently"
      raise ValueError(f"--workdir {sweep_dir} holds another sweep ({existing['config']}: its "
                       f"trial {changed[0]!r} {why}); use a new --workdir, or rerun with the "
                       "config that made it")
  elif os.path.isdir(sweep_dir) and os.listdir(sweep_dir):
    raise ValueError(f"--workdir {sweep_dir} is not empty and holds no "
                     f"{worker_lib.DEFINITION_FILE}; use a new or empty --workdir for a sweep")
  os.makedirs(sweep_dir, exist_ok=True)
  tmp = os.path.join(sweep_dir, worker_lib.DEFINITION_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(definition, f, indent=1, default=str)
  os.replace(tmp, os.path.join(sweep_dir, worker_lib.DEFINITION_FILE))
  return definition


def hashes(definition: dict) -> dict[str, str]:
  return {name: trial["hash"] for name, trial in definition["trials"].items()}


def study_name(sweep_dir: str) -> str:
  return os.path.basename(os.path.abspath(sweep_dir))


def launch(sweep_dir: str, storage_url: str = "", workers: int = 1,
           retry_failed: bool = False) -> dict:
  """Queues the due trials and runs `workers` processes; returns {name: state} after."""
  if workers < 1:
    raise ValueError(f"--workers={workers}: must be >= 1")
  definition = worker_lib.read_definition(sweep_dir)
  url = storage_url or study_lib.default_storage(sweep_dir)
  handle = study_lib.open_study(study_lib.open_storage(url), study_name(sweep_dir),
                                hashes(definition))
  before = study_lib.enqueue_due(handle, definition["trials"], sweep_dir, retry_failed)
  due = [n for n, s in before.items()
         if s in ("new", "interrupted", "waiting") or (retry_failed and s == "failed")]
  if due:
    _run_workers(sweep_dir, url, min(workers, len(due)))
  after = study_lib.attempts(handle)
  return {name: study_lib.state_of(after.get(name, [])) for name in definition["trials"]}


def _run_workers(sweep_dir: str, url: str, count: int) -> None:
  """Spawned processes (not forked: the parent may hold jax's threads). A stop signal to
  this process reaches the workers, which mark their trials interrupted and exit."""
  context = multiprocessing.get_context("spawn")
  procs = [context.Process(target=worker_lib.work, args=(sweep_dir, url, study_name(sweep_dir)),
                           name=f"sweep-worker-{i}") for i in range(count)]
  previous = signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    for p in procs:
      p.start()
    for p in procs:
      p.join()
  except KeyboardInterrupt:
    for p in procs:
      if p.is_alive():
        os.kill(p.pid, signal.SIGTERM)
    for p in procs:
      p.join(JOIN_TIMEOUT_S)
      if p.is_alive():
        p.kill()
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
  del frame
  raise KeyboardInterrupt(f"signal {signum}")
