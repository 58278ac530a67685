"""Helpers every family shares: errors, torch <-> numpy, reading checkpoint directories
(safetensors only, unless pickles are allowed), the HF state reader.

The tables each family declares, and the code that checks and runs them, are in
`llm/convert/table.py`; a new family is one new file plus a registry entry.
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


PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _shard_path(directory: str, index: str, shard: Any) -> str:
  """`directory/shard`, refusing names that would read a file outside `directory`. The
  check is on the name, not the resolved path: the hub's cache links shards to blobs."""
  parts = os.path.normpath(str(shard)).split(os.sep)
  require(isinstance(shard, str) and shard and not os.path.isabs(shard) and ".." not in parts,
          f"{index} names shard {shard!r}, which is outside the model directory; a "
          "checkpoint's shards must be files in its own directory")
  path = os.path.join(directory, shard)
  require(os.path.isfile(path), f"{index} names shard {shard!r}, which is missing from "
          f"{directory}")
  return path


def read_safetensors_dir(directory: str) -> State | None:
  """All tensors of `model.safetensors` or its sharded index; None if neither exists."""
  single = os.path.join(directory, "model.safetensors")
  if os.path.exists(single):
    return _read_safetensors_file(single)
  index = os.path.join(directory, "model.safetensors.index.json")
  if not os.path.exists(index):
    return None
  return {k: v for path in index_shards(index) for k, v in _read_safetensors_file(path).items()}


def index_shards(index: str) -> list[str]:
  """The shard files a `*.index.json` names (each inside its directory)."""
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    shards = sorted(set(weight_map.values()))
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ConversionError(f"{index} is not a checkpoint index (a JSON object with a "
                          f"weight_map of tensor name -> shard file): {e!r}") from None
  return [_shard_path(os.path.dirname(index), index, shard) for shard in shards]


def refuse_pickles(directory: str, allow_pickle: bool) -> None:
  """PyTorch pickles run code when loaded: read them only when the caller says so."""
  present = [f for f in PICKLE_FILES if os.path.exists(os.path.join(directory, f))]
  require(bool(present), f"{directory} holds no weights: no model.safetensors, "
          "model.safetensors.index.json or pytorch_model.bin")
  require(allow_pickle, f"{directory} holds only PyTorch pickle weights ({present[0]}), "
          "which can run code when loaded; convert them to safetensors, or allow them if "
          "you trust the source: allow_pickle=True (train: --config.train.init_from_pickle="
          "True)")
  if present[0].endswith(".index.json"):
    index_shards(os.path.join(directory, present[0]))


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
