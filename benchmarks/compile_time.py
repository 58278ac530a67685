"""Compile seconds of the train step by depth, scanned and unscanned, and from the cache.

  python benchmarks/compile_time.py                        # 2, 8, 24 layers; JSON out
  python benchmarks/compile_time.py --layers 2,4 --cache_runs 0   # quick

Each config's `train_step` (as `loop.compiled_steps` jits it) is lowered from abstract
shapes and compiled once, timed apart (trace+lower, compile), with the persistent
compilation cache on in an empty directory (`loop.use_compilation_cache`, what
`train.compilation_cache_dir` sets), so every compile here is a miss that fills it.
Then `--cache_runs` fresh processes compile the deepest scanned step again from that
directory: what a resumed run pays. The model is `common.MODEL` with `--model` overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import json_stdout, load_average, log, setup_logging

import jax

from llm import parallel
from llm.train import loop
from train_throughput import lm_batch, make_config, random_tokens


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", default="2,8,24", help="depths to compile")
  p.add_argument("--scan", default="True,False", help="scan_layers settings to compile")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--model", default="", help="model overrides, e.g. remat=full")
  p.add_argument("--cache_runs", type=int, default=1, help="fresh processes using the cache")
  p.add_argument("--cache_dir", default="", help="(internal) compile once with this cache")
  return p.parse_args()


def compile_seconds(layers: int, scan: bool, args) -> dict:
  overrides = ",".join(filter(None, [args.model, f"num_layers={layers}",
                                     f"scan_layers={scan}"]))
  cfg = make_config(args.batch, args.seq, overrides)
  mesh = parallel.make_mesh(cfg.parallel, jax.devices()[:1])
  make = loop.state_factory(cfg)
  shardings = loop.state_shardings(make, mesh)
  train_fn, _ = loop.compiled_steps(shardings, mesh)
  batch = lm_batch(random_tokens(args.batch, args.seq, cfg.model.vocab_size))
  start = time.perf_counter()
  lowered = train_fn.lower(jax.eval_shape(make), batch)
  lowered_at = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  return {"lower_s": lowered_at - start, "compile_s": done - lowered_at,
          "total_s": done - start}


def cached_runs(layers: int, runs: int, cache: str, args) -> list[dict]:
  out = []
  for _ in range(runs):
    cmd = [sys.executable, os.path.abspath(__file__), "--layers", str(layers), "--scan",
           "True", "--batch", str(args.batch), "--seq", str(args.seq), "--model",
           args.model, "--cache_dir", cache]
    out.append(json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                         text=True).stdout))
  return out


def main():
  args = parse_args()
  setup_logging()
  if args.cache_dir:  # one compile in this fresh process, through the persistent cache
    loop.use_compilation_cache(args.cache_dir)
    with json_stdout() as result:
      result.update(compile_seconds(int(args.layers), True, args))
    return
  with json_stdout() as result, tempfile.TemporaryDirectory() as cache:
    loop.use_compilation_cache(cache)
    result["load_average_before"] = load_average()
    depths = [int(n) for n in args.layers.split(",")]
    for scan in [s == "True" for s in args.scan.split(",")]:
      for layers in depths:
        key = f"{'scanned' if scan else 'unscanned'}_{layers}"
        result[key] = compile_seconds(layers, scan, args)
        log.info("%s: %s", key, result[key])
      if len(depths) > 1:
        first, last = (result[f"{'scanned' if scan else 'unscanned'}_{n}"] for n in
                       (depths[0], depths[-1]))
        result[f"{'scanned' if scan else 'unscanned'}_ratio_{depths[-1]}_vs_{depths[0]}"] = (
            last["total_s"] / first["total_s"])
    if args.cache_runs:
      result[f"scanned_{depths[-1]}_fresh_process_from_cache"] = cached_runs(
          depths[-1], args.cache_runs, cache, args)
    result["load_average_after"] = load_average()
    result["config"] = {"batch": args.batch, "seq": args.seq, "model_overrides": args.model}


if __name__ == "__main__":
  main()
