"""Post-training quantization of a param tree for inference: int8 / int4 weights, or a
half-precision cast; parameter bytes; quantized checkpoints.

`quantize_params(params, mode)` works on any family's tree (decoder, encoder,
encoder-decoder, MoE; scanned or per-layer): every matmul kernel and the token embedding
table (tied or not) become `llm.layers.quant.QArray`s. What stays float: biases, norms,
position and token-type tables, T5's relative-position biases (lookups of small tables),
and the MoE router, whose float32 logits decide which expert runs (a rounding flip there
changes a token's whole MLP for a few bytes saved).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llm.config import ConfigError
from llm.layers.quant import QArray, quantize

MODES = ("none", "bf16", "f16", "int8", "int4")
HALF = {"bf16": jnp.bfloat16, "f16": jnp.float16}
BITS = {"int8": 8, "int4": 4}
MANIFEST = "quantization.json"


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ConfigError(f"--quant {mode!r}: unknown quantization mode; use one of {', '.join(MODES)}")
  return mode


def inference_config(model_cfg, mode: str):
  """The model config to run params of `mode` with: half modes compute in that half
  dtype (a float32 dot would convert every half kernel back to float32 in memory); int
  modes keep the compute dtype (activations are not quantized)."""
  if check_mode(mode) in HALF:
    name = {"bf16": "bfloat16", "f16": "float16"}[mode]
    return dataclasses.replace(model_cfg, dtype=name, param_dtype=name)
  return model_cfg


def _keys(path) -> list[str]:
  return [str(getattr(k, "key", k)) for k in path]


def contracted_axes(path, shape) -> tuple[int, ...] | None:
  """The axes a kernel's dot contracts (negative), or None for a param that stays float.

  `Linear` kernels contract their leading axes (two for the attention output projection,
  (heads, head_dim) -> model), expert kernels (E, in, out) their middle one, and the token
  table its model axis (the tied projection x E^T; lookups take whole rows). A leading
  axis stacked by `nn.scan` ("layers") is not a kernel axis.
  """
  keys = _keys(path)
  name, parent = keys[-1], keys[-2] if len(keys) > 1 else ""
  if name == "embedding" and parent == "embed":
    return (-1,)
  if name != "kernel" or parent == "router":
    return None
  per_layer = len(shape) - ("layers" in keys)
  first = 1 if "moe" in keys else 0  # the expert axis is a batch axis of the dot
  in_dims = 2 if parent == "out" else 1
  return tuple(range(first - per_layer, first - per_layer + in_dims))


def quantize_params(params, mode: str):
  """The param tree for inference in `mode` (none | bf16 | f16 | int8 | int4)."""
  check_mode(mode)
  if any(isinstance(x, QArray) for x in jax.tree_util.tree_leaves(params, is_leaf=_is_q)):
    raise ConfigError("params are already quantized; quantize the float checkpoint instead")
  if mode == "none":
    return params
  if mode in HALF:
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, HALF[mode]), params)

  return _quantize_tree(params, BITS[mode])


@functools.partial(jax.jit, static_argnums=1)
def _quantize_tree(params, bits: int):
  def leaf(path, x):
    contract = contracted_axes(path, x.shape)
    if contract is None:
      return x
    # int8 dots without a batch axis (all but the experts') read (*free, *contracted) faster.
    return quantize(x, contract, bits, contract_last=bits == 8 and "moe" not in _keys(path))
  return jax.tree_util.tree_map_with_path(leaf, params)


def _is_q(x) -> bool:
  return isinstance(x, QArray)


def param_bytes(params) -> int:
  """Bytes the params occupy, int4 counted as half a byte."""
  def nbytes(x):
    bits = jnp.iinfo(x.dtype).bits if jnp.issubdtype(x.dtype, jnp.integer) else \
        jnp.finfo(x.dtype).bits
    return x.size * bits // 8
  return sum(nbytes(x) for x in jax.tree_util.tree_leaves(params))


def quantized_kernels(params) -> dict[str, bool]:
  """{path: quantized?} for every leaf quantize_params would turn into a QArray."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_q):
    contract = contracted_axes(path, x.shape if _is_q(x) else np.shape(x))
    if contract is not None:
      out[jax.tree_util.keystr(path)] = _is_q(x)
  return out


# ----------------------------------------------------------------------------- checkpoints


def _to_plain(params):
  """QArrays as {"values", "scale"} dicts (orbax stores plain trees) + their layouts."""
  layouts = {}

  def leaf(path, x):
    if not _is_q(x):
      return x
    layouts[jax.tree_util.keystr(path)] = {"contract": list(x.contract), "bits": x.bits,
                                           "contract_last": x.contract_last}
    return {"values": x.values if x.bits == 8 else x.values.astype(jnp.int8), "scale": x.scale}
  return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_q), layouts


def save(directory: str, params, mode: str) -> None:
  """Writes params already in `mode` (from quantize_params) as a quantized checkpoint."""
  check_mode(mode)
  plain, layouts = _to_plain(params)
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "params"), plain, force=True)
  with open(os.path.join(directory, MANIFEST), "w") as f:
    json.dump({"mode": mode, "layouts": layouts}, f)


def restore(directory: str, mode: str):
  """The params saved by `save(directory, ..., mode)`; a checkpoint of another mode (a
  quantized one read as float, or the reverse) is a ConfigError."""
  check_mode(mode)
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise ConfigError(f"{directory} holds no quantized checkpoint ({MANIFEST} is missing); "
                      "write one with llm.inference.quantize.save")
  with open(path) as f:
    manifest = json.load(f)
  if manifest["mode"] != mode:
    raise ConfigError(f"{directory} holds a {manifest['mode']} checkpoint, not {mode}; "
                      f"restore it with --quant {manifest['mode']}")
  with ocp.StandardCheckpointer() as ckptr:
    plain = ckptr.restore(os.path.abspath(os.path.join(directory, "params")))
  layouts = manifest["layouts"]

  def leaf(path, x):
    layout = layouts.get(jax.tree_util.keystr(path))
    if layout is None:
      return jnp.asarray(x)
    bits = layout["bits"]
    values = jnp.asarray(x["values"], jnp.int8 if bits == 8 else jnp.int4)
    # Checkpoints written before contract_last existed hold the float layout.
    return QArray(values, jnp.asarray(x["scale"]), tuple(layout["contract"]), bits,
                  layout.get("contract_last", False))
  is_stored_q = lambda x: isinstance(x, dict) and set(x) == {"values", "scale"}
  return jax.tree_util.tree_map_with_path(leaf, plain, is_leaf=is_stored_q)


# ----------------------------------------------------------------------------- comparison


def validation_perplexity(module, params, rows: dict, batch_size: int = 8) -> float:
  """Perplexity over packed rows (inputs / targets / weights / segment_ids / positions),
  in whole batches of `batch_size` (one compile)."""
  from llm.eval import log_likelihood, perplexity
  n = max(batch_size, len(rows["inputs"]) // batch_size * batch_size)
  logps, weights = [], []
  for start in range(0, n, batch_size):
    batch = {k: np.asarray(v[start:start + batch_size]) for k, v in rows.items()}
    logps.append(np.asarray(log_likelihood(module, params, batch)))
    weights.append(batch["weights"])
  return perplexity(np.concatenate(logps), np.concatenate(weights))


def compare_modes(model_cfg, trees: dict, rows: dict, prompt_len: int = 16,
                  new_tokens: int = 32, batches=(1, 32), repeats: int = 3) -> dict:
  """{mode: {param_bytes, perplexity, tokens_per_s_b{B}}} for params already in each mode.

  Decode is greedy, exactly `new_tokens` per row, prompts cut from the rows; calls of all
  modes are interleaved and the median counts (a busy machine slows them alike)."""
  import time
  from llm.inference import SamplingConfig, decode_layout, generate
  from llm.models import build
  modules = {mode: build(inference_config(model_cfg, mode)) for mode in trees}
  report = {mode: {"param_bytes": param_bytes(p),
                   "perplexity": validation_perplexity(modules[mode], p, rows)}
            for mode, p in trees.items()}
  sampling = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens)
  inputs = np.asarray(rows["inputs"])[:, :prompt_len]
  prompts = {b: np.resize(inputs, (b, prompt_len)).tolist() for b in batches}
  # Laid out once per batch size, as a server would hold them.
  laid = {(mode, b): decode_layout(modules[mode], trees[mode], b) for mode in trees
          for b in batches}
  run = lambda mode, b: generate(*laid[mode, b], prompts[b], sampling, jax.random.PRNGKey(0))
  times = {(mode, b): [] for mode in trees for b in batches}
  for key in times:
    run(*key)  # compile
  for _ in range(repeats):
    for key in times:
      start = time.perf_counter()
      run(*key)
      times[key].append(time.perf_counter() - start)
  for (mode, b), ts in times.items():
    report[mode][f"tokens_per_s_b{b}"] = b * new_tokens / float(np.median(ts))
  return report


def format_report(report: dict, base: str = "none") -> str:
  """The comparison as a table, each mode next to `base` (float32)."""
  speeds = sorted(k for k in report[base] if k.startswith("tokens_per_s"))
  header = ["mode", "param MB", "smaller", "val ppl", "ppl delta"]
  header += [f"{k[len('tokens_per_s_'):]} tok/s (x)" for k in speeds]
  lines = ["  ".join(f"{h:>16}" for h in header)]
  for mode, row in report.items():
    ref = report[base]
    cells = [mode, f"{row['param_bytes'] / 2**20:.2f}",
             f"{ref['param_bytes'] / row['param_bytes']:.2f}x", f"{row['perplexity']:.3f}",
             f"{100 * (row['perplexity'] / ref['perplexity'] - 1):+.2f}%"]
    cells += [f"{row[k]:.1f} ({row[k] / ref[k]:.2f}x)" for k in speeds]
    lines.append("  ".join(f"{c:>16}" for c in cells))
  return "\n".join(lines)
