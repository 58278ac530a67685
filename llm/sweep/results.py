"""Per-trial results, read from the trial's workdir alone (no jax, no storage).

A trial's workdir holds what every training run writes (`config.json`, `metrics.jsonl`)
plus `trial.json`, the sweep's record of its status and wall time over all attempts, so
a report can be made on any machine that sees the sweep directory.
"""

from __future__ import annotations

import json
import os
import socket
import time

from llm import config as config_lib, scaling

STATUS_FILE = "trial.json"
METRICS_FILE = "metrics.jsonl"  # as llm.train.metrics writes it (that module imports jax)
CONFIG_FILE = "config.json"


def read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def record(workdir: str, name: str, status: str, wall_s: float, error: str | None = None):
  """Writes WORKDIR/trial.json; wall time adds up over attempts (a resumed trial's total)."""
  os.makedirs(workdir, exist_ok=True)
  previous = read_json(os.path.join(workdir, STATUS_FILE)) or {}
  done_s = previous.get("wall_s", 0.0)
  value = {"name": name, "status": status, "wall_s": done_s + wall_s,
           "attempts": previous.get("attempts", 0) + (status == "running"),
           "error": error, "host": socket.gethostname(), "pid": os.getpid(),
           "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
  tmp = os.path.join(workdir, STATUS_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, os.path.join(workdir, STATUS_FILE))


def read_metrics(workdir: str) -> list[dict]:
  try:
    with open(os.path.join(workdir, METRICS_FILE)) as f:
      return [json.loads(line) for line in f if line.strip()]
  except OSError:
    return []


def curve(records: list[dict], key: str = "eval_loss") -> list[tuple[int, float]]:
  """(step, value) pairs; a step logged twice (a resumed run redoes the steps after its
  last checkpoint) keeps the later value."""
  points = {r["step"]: r[key] for r in records if key in r and "step" in r}
  return sorted(points.items())


def summarize_workdir(workdir: str) -> dict:
  """Final losses, tokens, params, FLOPs and speed of the run in `workdir`."""
  records = read_metrics(workdir)
  out: dict = {}
  for key in ("train_loss", "eval_loss", "tokens_per_s"):
    points = curve(records, key)
    if points:
      out[key] = points[-1][1]
  steps = [r["step"] for r in records if "step" in r]
  if steps:
    out["step"] = max(steps)
  saved = read_json(os.path.join(workdir, CONFIG_FILE))
  if saved is not None:
    model = config_lib.model_from_dict(saved["model"])
    seq_len, batch = saved["data"]["seq_len"], saved["data"]["batch_size"]
    out["params"] = scaling.param_count(model)
    out["active_params"] = scaling.param_count(model, active=True)
    if "step" in out:
      out["tokens"] = out["step"] * batch * seq_len
      out["flops"] = scaling.train_flops_per_token(model, seq_len) * out["tokens"]
  return out


def trial_status(workdir: str) -> dict:
  """The trial.json record, or `pending` for a trial that never started here."""
  return read_json(os.path.join(workdir, STATUS_FILE)) or {"status": "pending", "wall_s": None,
                                                           "error": None}
