"""f32 matmul GFLOP/s of XLA:CPU (jax) and PyTorch at the training benchmark's own shapes.

  python benchmarks/matmul_shapes.py            # JSON on stdout
  python benchmarks/matmul_shapes.py --repeats 31

`train_throughput.py` compares whole steps; this says how much of the gap is the matmul
library alone. Every projection of `common.MODEL` at batch 8 x seq 256 (M = 2048 rows),
forward (X W), input gradient (dY W^T) and weight gradient (X^T dY), and the n^3 peak;
the two frameworks alternate call by call on the same threads, medians reported.
"""

from __future__ import annotations

import argparse
import statistics

from common import MODEL, cores, interleaved, json_stdout, setup_logging

import jax
import jax.numpy as jnp
import numpy as np
import torch


def shapes(rows: int, model: dict) -> dict:
  """name -> (M, K, N) of every matmul a train step of `model` runs over `rows` tokens."""
  d, f, v = model["d_model"], model["d_ff"], model["vocab_size"]
  out = {}
  for name, (k, n) in {"qkv": (d, 3 * d), "attn_out": (d, d), "mlp_in": (d, f),
                       "mlp_out": (f, d), "lm_head": (d, v)}.items():
    out[f"{name}_forward"] = (rows, k, n)
    out[f"{name}_input_grad"] = (rows, n, k)
    out[f"{name}_weight_grad"] = (k, rows, n)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", type=int, default=8 * 256, help="tokens per step (batch x seq)")
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--peak_size", type=int, default=2048)
  args = p.parse_args()
  setup_logging()
  torch.set_num_threads(cores())
  matmul = jax.jit(jnp.matmul)
  todo = {**shapes(args.rows, MODEL), "peak": (args.peak_size,) * 3}
  with json_stdout() as result:
    rates = {}
    for name, (m, k, n) in todo.items():
      a_np = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
      b_np = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
      a, b = jnp.asarray(a_np), jnp.asarray(b_np)
      a_t, b_t = torch.from_numpy(a_np), torch.from_numpy(b_np)
      times = interleaved({"jax": lambda: matmul(a, b).block_until_ready(),
                           "torch": lambda: a_t @ b_t}, args.repeats)
      flops = 2 * m * k * n
      rates[name] = {"mkn": [m, k, n],
                     **{f"{side}_gflops": flops / statistics.median(ts) / 1e9
                        for side, ts in times.items()}}
      rates[name]["torch_over_jax"] = rates[name]["torch_gflops"] / rates[name]["jax_gflops"]
    result.update({"shapes": rates, "model": MODEL, "rows": args.rows, "cores": cores(),
                   "repeats": args.repeats, "jax_version": jax.__version__,
                   "torch_version": torch.__version__,
                   "median_torch_over_jax": statistics.median(
                       r["torch_over_jax"] for k, r in rates.items() if k != "peak")})


if __name__ == "__main__":
  main()
