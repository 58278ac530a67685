"""Metrics: JSONL log, loss-curve plot, and the measured matmul peak used for MFU."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm.train import safety

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
  """Appends one JSON object per record to WORKDIR/metrics.jsonl (process 0 only) and,
  with `tensorboard`, its scalars to WORKDIR/tensorboard/ for TensorBoard's UI."""

  def __init__(self, workdir: str, tensorboard: bool = False):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = jax.process_index() == 0
    self.events = None
    if tensorboard and self.enabled:
      from tensorboardX import SummaryWriter
      self.events = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), flush_secs=10)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    clean = {k: to_plain(v) for k, v in record.items()}
    with safety.disk_errors(f"writing {self.path}"), open(self.path, "a") as f:
      f.write(json.dumps(clean) + "\n")
    if self.events is not None:
      for key, value in clean.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          self.events.add_scalar(key, value, clean["step"])

  def close(self) -> None:
    if self.events is not None:  # tensorboardX writes from a queue: close drains it
      self.events.close()


def to_plain(value):
  """JSON-ready: scalars as floats, vectors (e.g. per-expert load) as lists."""
  if isinstance(value, (bool, int)):
    return value
  if isinstance(value, (np.ndarray, np.generic, jax.Array, float, int)):
    array = np.asarray(value)
    return float(array) if array.ndim == 0 else array.tolist()
  return value


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:  # only the last line can be cut short by a kill or a full disk
        raise ValueError(f"{path}: line {i + 1} is not JSON; fix or delete that line") from None
  return records


def keep_records_through(workdir: str, step: int) -> None:
  """Drops the records of steps after `step`: a resumed run replays the steps after its
  checkpoint, which an interrupted run may already have logged."""
  path = os.path.join(workdir, METRICS_FILE)
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill is dropped
      pass
  if len(kept) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)


def latest(workdir: str) -> dict:
  """The newest value of every metric in metrics.jsonl (train and eval records merged)."""
  merged: dict = {}
  for record in read_metrics(workdir):
    merged.update(record)
  return merged


def plot_losses(workdir: str, out_name: str = "loss.png") -> str | None:
  """Writes the train/eval loss curves of metrics.jsonl to a PNG; returns its path."""
  records = read_metrics(workdir)
  train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  if not train and not evals:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for points, label in ((train, "train"), (evals, "eval")):
    if points:
      ax.plot(*zip(*points), label=label, marker="o" if label == "eval" else None)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.legend()
  ax.grid(alpha=0.3)
  path = os.path.join(workdir, out_name)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of a square matmul on one device: the practical peak MFU is measured against."""
  device = jax.devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  b = jax.device_put(jnp.ones((n, n), dtype), device)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best
