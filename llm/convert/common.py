"""Helpers every family mapping shares: flat HF state dicts <-> nested llm params.

A family file only describes how one HF layer maps onto one llm block; stacking the
blocks for `nn.scan`, dtype handling and reading safetensors happen here, so a new
family (BERT, T5, BART, BLOOM, Mixtral) is one new file plus a registry entry.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import numpy as np

State = dict[str, np.ndarray]  # flat HF names -> float32 arrays
Params = dict[str, Any]  # nested llm params


class ConversionError(ValueError):
  """A checkpoint or config uses a feature the other side cannot express."""


def require(ok: bool, message: str) -> None:
  if not ok:
    raise ConversionError(message)


def require_hf_libraries(*names: str) -> None:
  """A one-line error naming what to install when `transformers` (or torch) is missing:
  the runtime requirements leave them out."""
  import importlib.util
  missing = [n for n in names if importlib.util.find_spec(n) is None]
  require(not missing, f"Hugging Face checkpoints need {' and '.join(missing)}, which the "
          "runtime requirements leave out: pip install 'transformers>=4.57,<6' (and torch "
          "to export), or pip install -e '.[hf]'")


def hf_field(hf_config: Any, name: str, default: Any = None) -> Any:
  return getattr(hf_config, name, default)


def reject_if(hf_config: Any, model_type: str, name: str, bad, why: str) -> None:
  """Raises naming `name` when the HF field's value makes `bad(value)` true."""
  value = hf_field(hf_config, name)
  require(not bad(value), f"{model_type} config.{name}={value!r} is not supported: {why}")


# torch <-> numpy. Conversion works in float32 whatever the checkpoint dtype, so parity
# checks are exact and bf16 checkpoints do not lose the mantissa twice.

def torch_state_to_numpy(state_dict: Mapping[str, Any]) -> State:
  import torch  # only needed when converting a live torch model
  return {k: v.detach().to(device="cpu", dtype=torch.float32).numpy()
          for k, v in state_dict.items() if v.is_floating_point()}


def numpy_state_to_torch(state: State) -> dict:
  import torch
  # np.array copies: arrays viewed from jax buffers are read-only, which torch rejects.
  return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state.items()}


def params_to_numpy(params: Any) -> Any:
  """Unboxes logical-partitioning metadata and pulls arrays to host float32."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), nn.unbox(params))


# Layer stacking: scanned params hold every block's leaf with a leading layer axis.

def stack_layers(blocks: list[Params], scan_layers: bool) -> Params:
  if scan_layers:
    return {"layers": jax.tree_util.tree_map(lambda *xs: np.stack(xs), *blocks)}
  return {f"layers_{i}": block for i, block in enumerate(blocks)}


def unstack_layers(params: Params, num_layers: int) -> list[Params]:
  """Per-block params, whichever layout `params` uses (trusting the tree, not the cfg)."""
  if "layers" in params:
    stacked = params["layers"]
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], stacked) for i in range(num_layers)]
  require(all(f"layers_{i}" in params for i in range(num_layers)),
          f"params hold neither 'layers' nor 'layers_0'..'layers_{num_layers - 1}'")
  return [params[f"layers_{i}"] for i in range(num_layers)]


# Reading a flat HF state, making sure nothing in it was silently dropped.

class StateReader:
  """Hands out HF tensors by name and remembers which ones were used.

  `finish` raises on tensors nobody asked for, because an unmapped weight (an extra
  bias, a new submodule) means our logits would differ from HF's without any error.
  """

  def __init__(self, state: State, model_type: str, ignore: Iterable[str] = ()):
    self._state = state
    self._used: set[str] = set()
    self._model_type = model_type
    self._ignore = [re.compile(p) for p in ignore]

  def has(self, name: str) -> bool:
    return name in self._state

  def __call__(self, name: str) -> np.ndarray:
    require(name in self._state, f"{self._model_type} checkpoint lacks tensor {name!r}")
    self._used.add(name)
    return self._state[name]

  def finish(self) -> None:
    left = sorted(k for k in self._state if k not in self._used
                  and not any(p.search(k) for p in self._ignore))
    require(not left, f"{self._model_type} checkpoint has tensors with no llm counterpart: "
            f"{', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")


def add_prefix(state: State, prefix: str, marker: str) -> State:
  """Base-model checkpoints (e.g. the hub's gpt2) omit the LM wrapper's prefix."""
  if any(k.startswith(marker) for k in state):
    return state
  return {(k if k.startswith("lm_head.") else prefix + k): v for k, v in state.items()}


# Safetensors on disk, read without torch.

def _read_safetensors_file(path: str) -> State:
  from safetensors import safe_open
  # The numpy framework cannot represent bfloat16; jax can, and pinning to the host CPU
  # keeps a large checkpoint off the accelerator while it is converted.
  with jax.default_device(jax.devices("cpu")[0]):
    with safe_open(path, framework="flax") as f:
      return {k: np.asarray(f.get_tensor(k), dtype=np.float32) for k in f.keys()}


def read_safetensors_dir(directory: str) -> State | None:
  """All tensors of `model.safetensors` or its sharded index; None if neither exists."""
  single = os.path.join(directory, "model.safetensors")
  if os.path.exists(single):
    return _read_safetensors_file(single)
  index = os.path.join(directory, "model.safetensors.index.json")
  if not os.path.exists(index):
    return None
  with open(index) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  state: State = {}
  for shard in shards:
    state.update(_read_safetensors_file(os.path.join(directory, shard)))
  return state


def fill_missing(params: Params, defaults: Params) -> Params:
  """`params` with every subtree it lacks taken from `defaults` (e.g. an `init` tree).

  Checkpoints carry only the heads they were trained with (a BertModel has no MLM head, a
  *ForMaskedLM no pooler or classifier); fine-tuning needs a full tree to start from.
  """
  if not isinstance(params, Mapping) or not isinstance(defaults, Mapping):
    return params
  out = dict(params)
  for key, value in defaults.items():
    out[key] = fill_missing(params[key], value) if key in params else value
  return out


# torch nn.Linear <-> llm Linear. torch stores (out, in); our kernels are (in..., out...).

def linear_from_torch(get, name: str, in_shape: tuple, out_shape: tuple,
                      bias: bool) -> Params:
  """Kernel (in_shape + out_shape) [and bias (out_shape)] from `name`.weight [/ .bias]."""
  p = {"kernel": get(f"{name}.weight").T.reshape(*in_shape, *out_shape)}
  if bias:
    p["bias"] = get(f"{name}.bias").reshape(out_shape)
  return p


def linear_to_torch(name: str, p: Params, size_in: int, size_out: int) -> State:
  """`name`.weight (size_out, size_in) [and .bias] from an llm Linear's params."""
  state = {f"{name}.weight": p["kernel"].reshape(size_in, size_out).T}
  if "bias" in p:
    state[f"{name}.bias"] = p["bias"].reshape(size_out)
  return state


def default_rope_theta(hf_config: Any, model_type: str) -> float:
  """rope_theta from `rope_parameters` (transformers 5) or the older flat fields; raises
  for any rope_type but "default" (llm RoPE has no frequency scaling)."""
  rope = dict(hf_field(hf_config, "rope_parameters") or hf_field(hf_config, "rope_scaling")
              or {})
  kind = rope.get("rope_type", rope.get("type", "default"))
  require(kind == "default", f"{model_type} config.rope_parameters (rope_scaling) "
          f"rope_type={kind!r} is not supported: llm RoPE has no frequency scaling "
          "(only 'default')")
  return float(rope.get("rope_theta", hf_field(hf_config, "rope_theta", 10000.0)))
