"""What a sampled decode step pays beyond the model, JSON on stdout: our top-k / top-p
filters and inverse-CDF draw next to their plain JAX forms (lax.top_k, a full-row sort,
jax.random.categorical), and `generate` with sampling next to greedy.

  python benchmarks/sampling_speed.py
  python benchmarks/sampling_speed.py --vocabs 4096 --rows 1 --repeats 3   # quick

Each piece runs `--calls` times inside one jitted loop (no dispatch), in interleaved
rounds; figures are medians in microseconds per call. The filters' kept sets are compared
with the plain forms' on the same logits. The generation model is the decode benchmarks'
(`common.MODEL`, random weights: the step's cost does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics

from common import MODEL, interleaved, json_stdout, setup_logging

import jax
import jax.numpy as jnp
import numpy as np

from llm import models
from llm.config import ModelConfig
from llm.inference import SamplingConfig, for_decoding, generate_sequences
from llm.inference.sampling import draw, top_k_filter, top_p_filter

NEG = -1e30


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--vocabs", default="4096,32000")
  p.add_argument("--rows", default="1,4")
  p.add_argument("--top_k", type=int, default=40)
  p.add_argument("--top_p", type=float, default=0.9)
  p.add_argument("--calls", type=int, default=50)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--repeats", type=int, default=7)
  return p.parse_args()


def sort_top_k(x, k):  # the plain form: lax.top_k for the k-th value
  return jnp.where(x >= jax.lax.top_k(x, k)[0][:, -1:], x, NEG)


def sort_top_p(x, p):  # the plain form: sort, cumulative mass, cutoff
  sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_x, axis=-1)
  inside = jnp.cumsum(probs, axis=-1) - probs < p
  return jnp.where(x >= jnp.min(jnp.where(inside, sorted_x, jnp.inf), -1, keepdims=True), x, NEG)


def pieces(args) -> dict:
  """Per (vocab, rows): microseconds per call of each piece, ours and plain."""
  k, p = args.top_k, args.top_p
  fns = {
      "top_k_ours": lambda r, x: top_k_filter(x, k), "top_k_plain": lambda r, x: sort_top_k(x, k),
      "top_p_ours": lambda r, x: top_p_filter(x, p), "top_p_plain": lambda r, x: sort_top_p(x, p),
      "draw_ours": lambda r, x: draw(r, jax.nn.softmax(x, -1)),
      "draw_plain": lambda r, x: jax.random.categorical(r, x, axis=-1),
  }

  def looped(fn):  # `calls` calls in one jit; each output feeds a sum so none is dropped
    def body(i, carry):
      x, total = carry
      out = fn(jax.random.fold_in(jax.random.PRNGKey(0), i), x)
      return x * 1.0001, total + jnp.sum(jnp.where(out > NEG / 2, 1.0, 0.0))
    return jax.jit(lambda x: jax.lax.fori_loop(0, args.calls, body, (x, 0.0))[1])

  result = {}
  for vocab in [int(v) for v in args.vocabs.split(",")]:
    for rows in [int(r) for r in args.rows.split(",")]:
      x = jnp.asarray(np.random.default_rng(0).standard_normal((rows, vocab), np.float32) * 3)
      calls = {name: (lambda f=looped(fn): f(x).block_until_ready()) for name, fn in fns.items()}
      times = interleaved(calls, args.repeats)
      us = {name: 1e6 * statistics.median(ts) / args.calls for name, ts in times.items()}
      entry = {f"{name}_us": v for name, v in us.items()}
      for piece in ("top_k", "top_p", "draw"):
        entry[f"{piece}_speedup"] = us[f"{piece}_plain"] / us[f"{piece}_ours"]
      kept = lambda f: np.asarray(f(x)) > NEG / 2
      entry["same_kept_sets"] = bool(
          (kept(lambda x: top_k_filter(x, k)) == kept(lambda x: sort_top_k(x, k))).all()
          and (kept(lambda x: top_p_filter(x, p)) == kept(lambda x: sort_top_p(x, p))).all())
      result[f"vocab_{vocab}_rows_{rows}"] = entry
  return result


def generation(args) -> dict:
  """ms per generated token (all rows) of `generate_sequences`: greedy and three samplers."""
  cfg = ModelConfig(**MODEL)
  module = models.build(cfg)
  params = module.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"]
  module, params = for_decoding(module, params)
  n, rng = args.new_tokens, jax.random.PRNGKey(1)
  samplers = {"greedy": SamplingConfig(temperature=0.0, max_new_tokens=n),
              "temperature": SamplingConfig(temperature=0.8, max_new_tokens=n),
              "top_k": SamplingConfig(temperature=0.8, top_k=args.top_k, max_new_tokens=n),
              "top_p": SamplingConfig(temperature=0.8, top_p=args.top_p, max_new_tokens=n)}
  result = {"vocab_size": cfg.vocab_size, "new_tokens": n}
  for rows in [int(r) for r in args.rows.split(",")]:
    prompts = [[1 + r, 2, 3, 4] for r in range(rows)]
    calls = {name: (lambda s=s: generate_sequences(module, params, prompts, s, rng))
             for name, s in samplers.items()}
    times = interleaved(calls, args.repeats)
    ms = {name: 1e3 * statistics.median(ts) / n for name, ts in times.items()}
    result[f"rows_{rows}"] = {**{f"{name}_ms_per_step": v for name, v in ms.items()},
                              **{f"{name}_over_greedy": ms[name] / ms["greedy"]
                                 for name in samplers if name != "greedy"}}
  return result


def main():
  args = parse_args()
  setup_logging()
  with json_stdout() as result:
    result.update({"top_k": args.top_k, "top_p": args.top_p, "calls": args.calls,
                   "repeats": args.repeats, "pieces": pieces(args),
                   "generation": generation(args), "jax_version": jax.__version__})


if __name__ == "__main__":
  main()
