"""Training tokens/s of `llm` (JAX) next to Hugging Face GPT-2 (PyTorch), same CPU and config.

  python benchmarks/train_throughput.py                     # full run, JSON on stdout
  python benchmarks/train_throughput.py --steps 2 --warmup 1 --repeats 1 --seq 64

Ours runs the real training path: `create_state` (AdamW + global-norm clipping) and the
jitted, state-donating `train_step` from `compiled_steps`, on a 1-device mesh. The peer
runs GPT2LMHeadModel with torch.optim.AdamW + clip_grad_norm_ on the same token batch.
The two sides alternate, `--repeats` times, so a noisy neighbour hurts both alike; the
best repeat counts. MFU divides our model FLOP/s by a float32 matmul peak measured here.

On a shared 2-core machine our side is often faster single-threaded too (2.50 vs 3.86 s
per step measured under load); XLA's threads are fixed at import, so compare with
  XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" python ...
"""

from __future__ import annotations

import argparse
import os
import platform

from common import (MODEL, best_and_median, cores, hf_gpt2, json_stdout, log,
                    peer_thread_counts, setup_logging, time_calls, with_threads)

import jax
import jax.numpy as jnp
import numpy as np
import torch

from llm import config as config_lib, parallel, scaling
from llm.train import loop
from llm.train.metrics import measure_matmul_peak


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, caches)")
  p.add_argument("--repeats", type=int, default=3, help="alternating timed repeats per side")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--peer_threads", default="cores,1", help="torch thread counts to try")
  p.add_argument("--peak_sizes", default="1024,2048,3072", help="matmul sizes for the peak")
  p.add_argument("--breakdown", action="store_true",
                 help="also time our forward, forward+backward, and full step apart")
  return p.parse_args()


def make_config(batch: int, seq: int) -> config_lib.Config:
  return config_lib.from_configdict({
      "model": MODEL, "data": {"seq_len": seq, "batch_size": batch},
      "train": {"steps": 10**6, "warmup_steps": 10}, "parallel": {"data": 1}})


def random_tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1), dtype=np.int32)


def ours(cfg: config_lib.Config, tokens: np.ndarray):
  """Returns a blocking one-step callable over our jitted train_step, plus its pieces."""
  mesh = parallel.make_mesh(cfg.parallel, jax.devices()[:1])
  state, shardings = loop.create_state(cfg, mesh)
  train_fn, _ = loop.compiled_steps(shardings, mesh)
  b, t = tokens.shape[0], tokens.shape[1] - 1
  batch = parallel.shard_batch({
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
      "segment_ids": np.ones((b, t), np.int32),
      "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
      "weights": np.ones((b, t), np.float32)}, mesh)
  holder = {"state": state}

  def step():
    # The state is donated, so each step must feed the previous step's output back.
    holder["state"], metrics = train_fn(holder["state"], batch)
    jax.block_until_ready(metrics)
  return step, holder, batch


def peer(tokens: np.ndarray):
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


def breakdown(holder, batch, steps: int, repeats: int) -> dict:
  """Seconds per call of forward, forward+backward (grads), and the whole train step."""
  state = holder["state"]
  loss = lambda p, b: state.loss_fn(p, state.frozen, b, None)[0]["loss_sum"]
  fwd, grad = jax.jit(loss), jax.jit(jax.grad(loss))
  out = {}
  for name, fn in (("forward", fwd), ("forward_backward", grad)):
    call = lambda: jax.block_until_ready(fn(holder["state"].params, batch))
    call()
    out[name + "_s"] = min(time_calls(call, steps) / steps for _ in range(repeats))
  return out


def matmul_peak(sizes: list[int]) -> dict:
  peaks = {n: measure_matmul_peak(n) for n in sizes}
  for n, flops in peaks.items():
    log.info("float32 matmul %d: %.1f GFLOP/s", n, flops / 1e9)
  return {str(n): f for n, f in peaks.items()}


def main():
  args = parse_args()
  setup_logging()
  torch.set_num_threads(cores())
  cfg = make_config(args.batch, args.seq)
  tokens = random_tokens(args.batch, args.seq, cfg.model.vocab_size)
  tokens_per_step = args.batch * args.seq
  with json_stdout() as result:
    our_step, holder, batch = ours(cfg, tokens)
    peer_step, peer_model = peer(tokens)
    sides = {"ours": our_step}
    for threads in peer_thread_counts(args.peer_threads):
      sides[f"peer_threads_{threads}"] = with_threads(peer_step, threads)
    for name, fn in sides.items():
      log.info("warming up %s (%d steps)", name, args.warmup)
      time_calls(fn, args.warmup)
    times = {name: [] for name in sides}
    for r in range(args.repeats):
      for name, fn in sides.items():
        times[name].append(time_calls(fn, args.steps) / args.steps)
        log.info("repeat %d %s: %.3f s/step", r, name, times[name][-1])
    torch.set_num_threads(cores())
    peer_by_threads = {k: tokens_per_step / min(v) for k, v in times.items() if k != "ours"}
    best_peer = max(peer_by_threads, key=peer_by_threads.get)
    peaks = matmul_peak([int(n) for n in args.peak_sizes.split(",")])
    peak = max(peaks.values())
    ours_tps = tokens_per_step / min(times["ours"])
    peer_tps = peer_by_threads[best_peer]
    flops_per_token = scaling.train_flops_per_token(cfg.model, args.seq)
    result.update({
        "config": {"model": MODEL, "batch": args.batch, "seq": args.seq},
        "ours_tokens_per_s": ours_tps, "peer_tokens_per_s": peer_tps,
        "speedup": ours_tps / peer_tps,
        "ours_step_s": best_and_median(times["ours"]),
        "peer_step_s": best_and_median(times[best_peer]), "peer_best_setting": best_peer,
        "peer_tokens_per_s_by_setting": peer_by_threads,
        "model_flops_per_token": flops_per_token,
        "ours_model_flops_per_s": ours_tps * flops_per_token,
        "peer_model_flops_per_s": peer_tps * flops_per_token,
        "matmul_peak_flops_per_s": peak, "matmul_peak_by_size": peaks,
        "mfu": ours_tps * flops_per_token / peak,
        "peer_mfu": peer_tps * flops_per_token / peak,
        "steps_timed": args.steps, "repeats": args.repeats, "warmup_steps": args.warmup,
        "targets": {"speedup>=1.5": ours_tps / peer_tps >= 1.5,
                    "mfu>=0.6": ours_tps * flops_per_token / peak >= 0.6},
        "peer_attn_implementation": getattr(peer_model.config, "_attn_implementation", None),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_version": jax.__version__, "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
        "cpu": platform.processor() or platform.machine(), "cores": cores(),
        "jax_devices": str(jax.devices()),
    })
    if args.breakdown:
      parts = breakdown(holder, batch, args.steps, args.repeats)
      parts["train_step_s"] = min(times["ours"])
      result["ours_breakdown"] = parts


if __name__ == "__main__":
  main()
