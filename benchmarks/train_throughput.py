"""Training tokens/s of `llm` next to Hugging Face GPT-2 in PyTorch and a plain-JAX GPT.

  python benchmarks/train_throughput.py                  # 20 steps x 3 repeats, JSON out
  python benchmarks/train_throughput.py --steps 3 --repeats 1 --seq 64   # a smoke run

One process, one schedule: every repeat times each side for `--steps` steps in turn
(ours: the jitted, state-donating `train_step` of `loop.compiled_steps`; plain JAX:
`plain_jax_gpt.py`; the peer: GPT2LMHeadModel with AdamW + clip_grad_norm_), then our
forward, forward+backward and optimizer update as three separately jitted functions,
then a float32 matmul in JAX and in torch (the in-run peak). Each call is timed alone,
blocking on the updated state; medians and interquartile ranges are over all timed
calls (compile and `--warmup` steps excluded). Both frameworks run on the same pinned
CPUs (`--cpus`; torch gets that many threads, XLA sizes its pool from the affinity).
The load average is recorded before and after; `busy` warns when other work ran.
Model FLOPs per token are the analytic count (`llm.scaling`) next to XLA's cost
analysis of the unscanned forward+backward (a scanned loop body is counted once).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import platform
import statistics
import time

from common import (MODEL, hf_gpt2, json_stdout, load_average, log, median_iqr,
                    setup_logging, theoretical_f32_peak)

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import plain_jax_gpt
from llm import config as config_lib, parallel, scaling
from llm.train import loop


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=20, help="timed steps per side per repeat")
  p.add_argument("--part_steps", type=int, default=5,
                 help="timed calls of each of forward / forward+backward / update per repeat")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, caches)")
  p.add_argument("--repeats", type=int, default=3, help="interleaved rounds over all sides")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--cpus", default="", help="CPU ids to pin to, e.g. 0,1 (default: all allowed)")
  p.add_argument("--peak_size", type=int, default=2048, help="n of the n x n matmul peak")
  p.add_argument("--model", default="", help="overrides of the model, e.g. scan_layers=False")
  p.add_argument("--variants", default="",
                 help="';'-separated extra model overrides timed as more sides of ours, "
                      "e.g. 'scan_layers=False;remat=dots'")
  return p.parse_args()


def make_config(batch: int, seq: int, overrides: str = "") -> config_lib.Config:
  model = dict(MODEL)
  for item in filter(None, overrides.split(",")):
    key, value = item.split("=")
    try:
      model[key] = ast.literal_eval(value)  # numbers, True / False
    except (ValueError, SyntaxError):
      model[key] = value  # a plain string, e.g. remat=dots
  return config_lib.from_configdict({
      "model": model, "data": {"seq_len": seq, "batch_size": batch},
      "train": {"steps": 10**6, "warmup_steps": 10}, "parallel": {"data": 1}})


def random_tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1), dtype=np.int32)


def lm_batch(tokens: np.ndarray) -> dict:
  b, t = tokens.shape[0], tokens.shape[1] - 1
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((b, t), np.int32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "weights": np.ones((b, t), np.float32)}


def ours(cfg: config_lib.Config, tokens: np.ndarray) -> dict:
  """Blocking callables: the real train step, and its three parts jitted apart."""
  mesh = parallel.make_mesh(cfg.parallel, jax.devices()[:1])
  state, shardings = loop.create_state(cfg, mesh)
  train_fn, _ = loop.compiled_steps(shardings, mesh)
  batch = parallel.shard_batch(lm_batch(tokens), mesh)
  holder = {"state": state}

  def step():  # the state is donated: feed each step's output to the next
    holder["state"], _ = train_fn(holder["state"], batch)
    jax.block_until_ready(holder["state"])

  loss = lambda p, b: state.loss_fn(p, state.frozen, b, None)[0]["loss_sum"]
  forward, grad = jax.jit(loss), jax.jit(jax.grad(loss))
  update = jax.jit(lambda g, o, p: optax.apply_updates(p, state.tx.update(g, o, p)[0]))
  params = lambda: holder["state"].params  # the live ones (each step donates the last)
  grads = grad(params(), batch)
  calls = {
      "ours": step,
      "ours_forward": lambda: jax.block_until_ready(forward(params(), batch)),
      "ours_forward_backward": lambda: jax.block_until_ready(grad(params(), batch)),
      "ours_update": lambda: jax.block_until_ready(
          update(grads, holder["state"].opt_state, params())),
  }
  return calls


def plain_jax(tokens: np.ndarray):
  _, params, opt_state, _, step_fn = plain_jax_gpt.make(MODEL, jnp.asarray(tokens))
  holder = {"s": (params, opt_state)}
  tokens = jnp.asarray(tokens)

  def step():
    params, opt_state, _ = step_fn(*holder["s"], tokens)
    holder["s"] = jax.block_until_ready((params, opt_state))
  return step


def pytorch(tokens: np.ndarray):
  model = hf_gpt2()
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.1)
  ids = torch.from_numpy(tokens[:, :-1].astype(np.int64))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss  # labels are shifted inside the model
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
  return step, model


def matmul_calls(n: int) -> dict:
  a = jnp.ones((n, n), jnp.float32)
  jax_mm = jax.jit(lambda x: x @ x)
  t = torch.ones((n, n))
  return {"matmul_jax": lambda: jax.block_until_ready(jax_mm(a)),
          "matmul_torch": lambda: torch.mm(t, t)}


def timed(fn, calls: int) -> tuple[list[float], list[float]]:
  """Wall seconds and this process's CPU seconds (all threads) of each call."""
  wall, cpu = [], []
  for _ in range(calls):
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return wall, cpu


def xla_flops(cfg: config_lib.Config, tokens: np.ndarray) -> float:
  """XLA's FLOP count of the unscanned model's forward+backward (lowered, not compiled)."""
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False))
  make = loop.state_factory(cfg)
  state = jax.eval_shape(make)
  loss = lambda p, b: state.loss_fn(p, state.frozen, b, None)[0]["loss_sum"]
  return jax.jit(jax.grad(loss)).lower(state.params, lm_batch(tokens)).cost_analysis()["flops"]


def main():
  args = parse_args()
  setup_logging()
  if args.cpus:
    os.sched_setaffinity(0, [int(c) for c in args.cpus.split(",")])
  cpus = len(os.sched_getaffinity(0))
  torch.set_num_threads(cpus)  # XLA's pool is sized from the same affinity at first use
  load_before = load_average()
  cfg = make_config(args.batch, args.seq, args.model)
  tokens = random_tokens(args.batch, args.seq, cfg.model.vocab_size)
  tokens_per_step = args.batch * args.seq
  with json_stdout() as result:
    calls = ours(cfg, tokens)
    for variant in filter(None, args.variants.split(";")):
      overrides = ",".join(filter(None, [args.model, variant]))
      calls[f"ours[{variant}]"] = ours(make_config(args.batch, args.seq, overrides),
                                       tokens)["ours"]
    calls["plain_jax"] = plain_jax(tokens)
    calls["pytorch"], peer_model = pytorch(tokens)
    calls.update(matmul_calls(args.peak_size))
    counts = {k: args.part_steps if k.startswith("ours_") else 3 if k.startswith("matmul")
              else args.steps for k in calls}
    for name, fn in calls.items():
      log.info("warming up %s", name)
      timed(fn, args.warmup)
    times = {name: [] for name in calls}
    cpu_times = {name: [] for name in calls}
    for r in range(args.repeats):
      for name, fn in calls.items():
        wall, cpu = timed(fn, counts[name])
        times[name] += wall
        cpu_times[name] += cpu
        log.info("repeat %d %s: median %.3f s", r, name,
                 statistics.median(times[name][-counts[name]:]))
    load_after = load_average()
    stats = {name: median_iqr(ts) for name, ts in times.items()}
    steps = [k for k in calls if not k.startswith(("ours_", "matmul"))]
    tps = {k: tokens_per_step / stats[k]["median_s"] for k in steps}
    peak = {k: 2 * args.peak_size ** 3 / stats[f"matmul_{k}"]["median_s"] for k in ("jax", "torch")}
    flops_per_token = scaling.train_flops_per_token(cfg.model, args.seq)
    xla = xla_flops(cfg, tokens) / tokens_per_step
    ceiling = theoretical_f32_peak(cpus)
    model_flops = {k: v * flops_per_token for k, v in tps.items()}
    result.update({
        "config": {"model": dataclasses.asdict(cfg.model), "batch": args.batch,
                   "seq": args.seq},
        "tokens_per_s": tps,
        "speedup_vs_pytorch": tps["ours"] / tps["pytorch"],
        "speedup_vs_plain_jax": tps["ours"] / tps["plain_jax"],
        "seconds_per_call": stats,
        # On a shared machine wall time counts others' work too; CPU seconds (summed
        # over threads, spin-waits included) show what each side itself spent.
        "cpu_seconds_per_call": {k: median_iqr(v) for k, v in cpu_times.items()},
        "tokens_per_cpu_s": {k: tokens_per_step / statistics.median(cpu_times[k])
                             for k in steps},
        "model_flops_per_token": flops_per_token,
        "xla_flops_per_token_forward_backward_unscanned": xla,
        "model_flops_per_s": model_flops,
        "matmul_peak_flops_per_s": peak, "matmul_size": args.peak_size,
        "theoretical_f32_peak": ceiling,
        "mfu_of_matmul_peak": {k: v / peak["jax"] for k, v in model_flops.items()},
        "mfu_of_theoretical": {k: v / ceiling["flops_per_s"] for k, v in model_flops.items()},
        "ours_parts_flop_rate": {
            "forward": tokens_per_step * scaling.forward_flops_per_token(cfg.model, args.seq)
            / stats["ours_forward"]["median_s"],
            "forward_backward": tokens_per_step * flops_per_token
            / stats["ours_forward_backward"]["median_s"]},
        "targets": {"vs_pytorch>=1.2": tps["ours"] / tps["pytorch"] >= 1.2,
                    "vs_plain_jax>=1.3": tps["ours"] / tps["plain_jax"] >= 1.3,
                    "mfu>=0.65": model_flops["ours"] / peak["jax"] >= 0.65},
        "load_average_before": load_before, "load_average_after": load_after,
        # Our own threads add about `cpus` to the 1-minute average during the run.
        "busy": load_before[0] > 1.0 or load_after[0] > cpus + 1.0,
        "steps_timed": args.steps, "repeats": args.repeats, "warmup_steps": args.warmup,
        "peer_attn_implementation": getattr(peer_model.config, "_attn_implementation", None),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "cpus": cpus,
        "jax_version": jax.__version__, "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
        "cpu": platform.processor() or platform.machine(),
    })
    if result["busy"]:
      log.warning("the machine was busy (load %s -> %s): trust ratios, not absolute figures",
                  load_before, load_after)


if __name__ == "__main__":
  main()
