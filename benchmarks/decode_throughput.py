"""Batch-1 greedy decode tokens/s of `llm` next to Hugging Face GPT-2 `generate`, same CPU.

  python benchmarks/decode_throughput.py                    # full run, JSON on stdout
  python benchmarks/decode_throughput.py --new_tokens 16 --repeats 2

Both sides hold the same weights (ours converted from the peer with `llm.convert`), read
a 16-token prompt and emit exactly `--new_tokens` tokens (EOS cannot end either early).
Batch-1 decode is memory bound: every token reads every weight once, so the bound is
read bandwidth (measured here) / bytes read per token (params + the KV cache so far).
"""

from __future__ import annotations

import argparse
import os

from common import (best_and_median, cores, hf_gpt2, json_stdout, log, peer_thread_counts,
                    setup_logging, time_calls, with_threads)

import jax
import jax.numpy as jnp
import numpy as np
import torch

from llm import convert, models
from llm.inference import SamplingConfig, for_decoding, generate


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5, help="timed calls per side; best counts")
  p.add_argument("--peer_threads", default="cores,1", help="torch thread counts to try")
  p.add_argument("--bandwidth_mb", type=int, default=512, help="array size for bandwidth")
  return p.parse_args()


def ours(hf_model, prompt: list[int], new_tokens: int):
  """A blocking call of our jitted KV-cache generate on the peer's weights, and its info."""
  cfg, np_params = convert.from_transformers(hf_model)
  # The decode layout once (per-layer params, fused q/k/v), as a server would hold it.
  module, params = for_decoding(models.build(cfg), jax.device_put(np_params))
  rng = jax.random.PRNGKey(0)

  def call(n=new_tokens):
    # generate() returns host lists, so the device work is done when it returns.
    return generate(module, params, [prompt], SamplingConfig(temperature=0.0,
                                                             max_new_tokens=n), rng)[0]
  return call, cfg, params


def peer(hf_model, prompt: list[int], new_tokens: int):
  ids = torch.tensor([prompt], dtype=torch.long)

  def call():
    with torch.no_grad():
      out = hf_model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, use_cache=True,
                              pad_token_id=hf_model.config.eos_token_id,
                              attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()
  return call


def best_time(fn, repeats: int) -> tuple[float, list[float]]:
  fn()  # compile / allocate
  times = [time_calls(fn, 1) for _ in range(repeats)]
  return min(times), times


def read_bandwidth(megabytes: int, repeats: int = 7) -> dict:
  """Bytes/s streaming a float32 array once, several ways; the fastest is the bound."""
  n = megabytes * 2**20 // 4
  x_np = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
  x = jax.device_put(x_np)
  # A (n/1024, 1024) x (1024,) matvec is what decode does with its weights (multi-threaded).
  w = x.reshape(-1, 1024)
  v = jnp.ones((1024,), jnp.float32)
  x_t = torch.from_numpy(x_np)
  ways = {
      "jax_sum": lambda: jax.jit(jnp.sum)(x).block_until_ready(),
      "jax_matvec": lambda: jax.jit(jnp.matmul)(w, v).block_until_ready(),
      "numpy_sum": lambda: x_np.sum(),
      "torch_sum": lambda: x_t.sum(),
  }
  out = {}
  for name, fn in ways.items():
    best, _ = best_time(fn, repeats)
    out[name] = n * 4 / best
    log.info("read bandwidth %s: %.1f GB/s", name, out[name] / 1e9)
  return out


def bytes_per_token(cfg, params, prompt_len: int, new_tokens: int) -> dict:
  """Weights every generated token must read, plus the mean KV cache it attends to.

  The learned-position table is read one row per token, not whole; the tied token
  embedding is read whole (it is the LM head).
  """
  total = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  pos = params["pos_embed"]["embedding"] if "pos_embed" in params else None
  if pos is not None:
    total -= pos.size * pos.dtype.itemsize - pos.shape[1] * pos.dtype.itemsize
  mean_context = prompt_len + (new_tokens + 1) / 2
  kv_per_slot = 2 * cfg.num_layers * cfg.kv_heads * cfg.dim_per_head * 4
  return {"param_bytes_per_token": total, "kv_bytes_per_token": kv_per_slot * mean_context,
          "kv_bytes_per_token_full_cache": kv_per_slot * (prompt_len + new_tokens)}


def main():
  args = parse_args()
  setup_logging()
  torch.set_num_threads(cores())
  hf_model = hf_gpt2().eval()
  vocab = hf_model.config.vocab_size
  prompt = np.random.default_rng(0).integers(0, vocab - 1, args.prompt_len).tolist()
  n = args.new_tokens
  with json_stdout() as result:
    our_call, cfg, params = ours(hf_model, prompt, n)
    peer_call = peer(hf_model, prompt, n)
    ours_s, ours_all = best_time(our_call, args.repeats)
    peer_runs = {}
    for threads in peer_thread_counts(args.peer_threads):
      peer_runs[f"peer_threads_{threads}"] = best_time(with_threads(peer_call, threads),
                                                      args.repeats)
      log.info("%d threads: peer %.3f s", threads, peer_runs[f"peer_threads_{threads}"][0])
    torch.set_num_threads(cores())
    best_peer = min(peer_runs, key=lambda k: peer_runs[k][0])
    peer_s, peer_all = peer_runs[best_peer]
    one_s, _ = best_time(lambda: our_call(1), args.repeats)  # prefill + first token
    ours_tokens, peer_tokens = our_call(), peer_call()
    assert len(ours_tokens) == n and len(peer_tokens) == n, (len(ours_tokens), len(peer_tokens))
    bandwidth = read_bandwidth(args.bandwidth_mb)
    bw = max(bandwidth.values())
    sizes = bytes_per_token(cfg, params, args.prompt_len, n)
    per_token = sizes["param_bytes_per_token"] + sizes["kv_bytes_per_token"]
    ours_tps, peer_tps = n / ours_s, n / peer_s
    steady_tps = (n - 1) / (ours_s - one_s) if n > 1 else float("nan")
    bound = bw / per_token
    result.update({
        "prompt_len": args.prompt_len, "new_tokens": n, "batch": 1, "repeats": args.repeats,
        "ours_tokens_per_s": ours_tps, "peer_tokens_per_s": peer_tps,
        "speedup": ours_tps / peer_tps,
        "ours_call_s": best_and_median(ours_all), "peer_call_s": best_and_median(peer_all),
        "peer_best_setting": best_peer,
        "peer_tokens_per_s_by_setting": {k: n / v[0] for k, v in peer_runs.items()},
        "ours_prefill_plus_first_token_s": one_s,
        "ours_steady_state_tokens_per_s": steady_tps,
        "ours_ms_per_step": 1e3 / steady_tps,
        "read_bandwidth_bytes_per_s": bw, "read_bandwidth_by_method": bandwidth,
        **sizes, "bytes_per_token": per_token,
        "bound_tokens_per_s": bound, "bound_ms_per_token": 1e3 / bound,
        "fraction_of_bound": ours_tps / bound,
        "steady_state_fraction_of_bound": steady_tps / bound,
        "peer_fraction_of_bound": peer_tps / bound,
        "same_tokens_as_peer": ours_tokens == peer_tokens,
        "first_mismatch": next((i for i, (a, b) in enumerate(zip(ours_tokens, peer_tokens))
                                if a != b), None),
        "targets": {"speedup>=3": ours_tps / peer_tps >= 3,
                    "fraction_of_bound>=0.8": ours_tps / bound >= 0.8},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_version": jax.__version__, "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
        "cores": cores(),
    })


if __name__ == "__main__":
  main()
