"""Shared pieces of the speed benchmarks: the model both sides run, timing, JSON out.

Every benchmark prints exactly one JSON object on stdout; anything a library prints
while it runs is sent to stderr (see `json_stdout`) so the output stays parseable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import sys
import time
from typing import Callable

# Run as `python benchmarks/x.py` or `python -m benchmarks.x` from the repo root alike.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

log = logging.getLogger("benchmarks")

# GPT-2 style: learned positions, LayerNorm, tanh GELU, biases, tied LM head, float32.
MODEL = dict(family="decoder", vocab_size=8192, d_model=384, num_layers=6, num_heads=6,
             d_ff=1536, max_len=256, positions="learned", norm="layernorm",
             activation="gelu", use_bias=True, tie_embeddings=True, dropout=0.0,
             dtype="float32", param_dtype="float32")


def cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def hf_gpt2(model: dict = MODEL):
  """The peer: transformers' GPT-2 with the same sizes and dropout off."""
  from transformers import GPT2Config, GPT2LMHeadModel
  config = GPT2Config(n_layer=model["num_layers"], n_embd=model["d_model"],
                      n_head=model["num_heads"], n_inner=model["d_ff"],
                      vocab_size=model["vocab_size"], n_positions=model["max_len"],
                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                      # in-vocabulary ids (the 50256 default is outside 8192)
                      bos_token_id=model["vocab_size"] - 1,
                      eos_token_id=model["vocab_size"] - 1)
  return GPT2LMHeadModel(config)


def peer_thread_counts(spec: str) -> list[int]:
  """Parses --peer_threads ("cores,1"): torch intra-op thread counts to try.

  With 2 cores and any other busy process, torch's OpenMP workers wait a scheduler
  slice (~4 ms) at every op barrier (measured: a 1x384x1152 addmm takes 4.3 ms at 2
  threads vs 0.1 ms at 1), so the peer is also timed single-threaded and its best counts.
  """
  counts = [cores() if part == "cores" else int(part) for part in spec.split(",")]
  return list(dict.fromkeys(counts))


def with_threads(fn: Callable[[], object], threads: int) -> Callable[[], object]:
  import torch

  def call():
    torch.set_num_threads(threads)
    return fn()
  return call


def time_calls(fn: Callable[[], object], calls: int) -> float:
  """Seconds for `calls` back-to-back calls; `fn` must block until its work is done."""
  start = time.perf_counter()
  for _ in range(calls):
    fn()
  return time.perf_counter() - start


def interleaved(calls: dict, repeats: int) -> dict:
  """{name: [seconds per call]}: each call once first (compile, warm-up), then once per
  round for `repeats` rounds, so a change in a shared host's load hits every side alike."""
  for fn in calls.values():
    fn()
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      times[name].append(time_calls(fn, 1))
  return times


def best_and_median(times: list[float]) -> dict:
  return {"best_s": min(times), "median_s": statistics.median(times), "runs": len(times)}


def median_iqr(times: list[float]) -> dict:
  """Median and interquartile range of per-call seconds (the spread a busy machine adds)."""
  q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
  return {"median_s": median, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "calls": len(times)}


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def theoretical_f32_peak(cpus: int) -> dict:
  """cpus x f32 FLOP/cycle x clock, from /proc/cpuinfo: two FMA units of 16 (AVX-512) or
  8 (AVX2) lanes, 2 FLOP each; the clock is the reported (base) MHz, so turbo may beat it."""
  text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
  flags = set(next((l.split(":")[1].split() for l in text.splitlines()
                    if l.startswith("flags")), []))
  lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
  mhz = next((float(l.split(":")[1]) for l in text.splitlines() if l.startswith("cpu MHz")), 0.0)
  per_cycle = 2 * lanes * 2
  return {"flops_per_s": cpus * per_cycle * mhz * 1e6, "cpus": cpus,
          "f32_flop_per_cycle_per_core": per_cycle, "mhz": mhz,
          "isa": "avx512f" if lanes == 16 else "avx2" if lanes == 8 else "sse"}


def setup_logging():
  # Our own handler: jax/orbax may already have configured the root logger.
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
  log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False


@contextlib.contextmanager
def json_stdout():
  """Yields a dict to fill; prints it as the only line on the real stdout at exit, with
  the 1-minute load average before and after (on a shared machine it says how far to
  trust the figures)."""
  result: dict = {}
  real_stdout = sys.stdout
  load_before = os.getloadavg()[0]
  with contextlib.redirect_stdout(sys.stderr):
    yield result
  result["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
  real_stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
  real_stdout.flush()
