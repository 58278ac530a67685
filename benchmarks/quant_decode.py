"""Greedy decode tokens/s at batch 1 and 32 for f32, bf16, int8 and int4 params, and
qwix's int8 on the same model, in one interleaved run (medians).

  python benchmarks/quant_decode.py                       # JSON on stdout
  python benchmarks/quant_decode.py --new_tokens 16 --repeats 2

The model is `common.MODEL` (GPT-2 style, 6 x 384, vocab 8192) with an untied LM head and
per-layer params, so that qwix (which quantizes the kernels its interception sees in a
dot_general and keeps lookups float) quantizes the same matmuls as we do. Each call
reads a 16-token prompt per row and emits exactly `--new_tokens` tokens; tokens/s is
rows x new tokens / wall time of the whole `generate` call (prefill included).
qwix runs weight-only int8 (`qwix_int8`) and with int8 activations too (`qwix_w8a8`).

Whether int8 beats f32 at batch 1 depends on where the weights live: the 68 MB default
fits in a large L3 (then f32 reads them at cache speed and int8's extra kernels weigh);
`--model d_model=1024,num_heads=16,d_ff=4096,num_layers=12` (168M params, 672 MB in f32)
is read from DRAM on any current host, as a real model's weights are.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import MODEL, json_stdout, log, setup_logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm import config as config_lib
from llm import models
from llm.inference import SamplingConfig, decode_layout, generate
from llm.inference.quantize import inference_config, param_bytes, quantize_params

OURS = ("none", "bf16", "int8", "int4")


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--batches", default="1,32")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per variant and batch")
  p.add_argument("--no_qwix", action="store_true")
  p.add_argument("--model", default="", help="overrides of common.MODEL: key=int,...")
  return p.parse_args()


def variants(cfg, params, with_qwix: bool) -> dict:
  """{name: (module, params)}."""
  out = {mode: (models.build(inference_config(cfg, mode)), quantize_params(params, mode))
         for mode in OURS}
  if with_qwix:
    import qwix
    module = models.build(cfg)
    for name, act in (("qwix_int8", None), ("qwix_w8a8", jnp.int8)):
      rules = [qwix.QtRule(module_path="(layers|lm_head).*", weight_qtype=jnp.int8,
                           act_qtype=act)]
      qmodule = qwix.quantize_model(module, qwix.PtqProvider(rules))
      abstract = jax.eval_shape(qmodule.init, jax.random.PRNGKey(0),
                                np.ones((1, 8), np.int32))["params"]
      out[name] = (qmodule, qwix.quantize_params(params, abstract))
  return out


def main():
  args = parse_args()
  setup_logging()
  model = dict(MODEL, tie_embeddings=False, scan_layers=False,
               **{k: int(v) for k, v in (kv.split("=") for kv in args.model.split(",") if kv)})
  cfg = config_lib.model_from_dict(model)
  module = models.build(cfg)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), np.ones((1, 8), np.int32))["params"]
  params = nn.unbox(params)
  batches = [int(b) for b in args.batches.split(",")]
  rng = np.random.default_rng(0)
  prompts = {b: rng.integers(1, cfg.vocab_size, (b, args.prompt_len)).tolist() for b in batches}
  sampling = SamplingConfig(temperature=0.0, max_new_tokens=args.new_tokens)
  runs = variants(cfg, params, not args.no_qwix)

  # Laid out for decoding at each batch size once, as a server would (`generate` then
  # leaves them as they are); qwix's trees as qwix made them.
  laid = {(name, b): decode_layout(*runs[name], b) if name in OURS else runs[name]
          for name in runs for b in batches}

  def call(name, b):
    m, p = laid[name, b]
    out = generate(m, p, prompts[b], sampling, jax.random.PRNGKey(0))
    return out.lists() if hasattr(out, "lists") else out

  first = {}
  for name in runs:
    for b in batches:
      log.info("compiling %s at batch %d", name, b)
      first[name, b] = call(name, b)
  times = {key: [] for key in first}
  for r in range(args.repeats):
    for key in times:  # interleaved: load changes hit every variant alike
      start = time.perf_counter()
      call(*key)
      times[key].append(time.perf_counter() - start)
    log.info("repeat %d done", r)

  with json_stdout() as result:
    result["config"] = dict(model=model,
                            prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                            repeats=args.repeats, devices=str(jax.devices()[0]))
    base = {b: statistics.median(times["none", b]) for b in batches}
    for name, (_, p) in runs.items():
      row = {"param_bytes": param_bytes(p)}
      for b in batches:
        median = statistics.median(times[name, b])
        row[f"tokens_per_s_b{b}"] = round(b * args.new_tokens / median, 1)
        row[f"speedup_vs_f32_b{b}"] = round(base[b] / median, 3)
        # Greedy agreement with f32 over all rows and steps (a diagnostic, not accuracy).
        same = np.mean([x == y for a, c in zip(first[name, b], first["none", b])
                        for x, y in zip(a, c)])
        row[f"greedy_match_f32_b{b}"] = round(float(same), 3)
      row["size_vs_f32"] = round(param_bytes(runs["none"][1]) / row["param_bytes"], 2)
      result[name] = row


if __name__ == "__main__":
  main()
