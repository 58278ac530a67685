"""Hugging Face `transformers` checkpoints <-> (ModelConfig, params), one file per family.

  cfg, params = from_transformers(hf_model_or_dir, scan_layers=True)
  hf_model = to_transformers(cfg, params)          # torch, float32, eval mode
  save_pretrained(cfg, params, out_dir)            # config.json + model.safetensors
  cfg, params = load_pretrained(out_dir)           # safetensors read directly, no torch

Families: decoders gpt2, llama, bloom (ALiBi), mixtral (MoE); encoders bert, roberta
(llm/convert/bert.py, which also says which heads a converted encoder carries);
encoder-decoders t5 (v1.0 and v1.1), bart (llm/convert/t5.py, bart.py: LM heads, padding).

Params come back as plain nested dicts of float32 numpy arrays (the tree
`nn.unbox(module.init(...))["params"]` has), left on the host so callers can shard them
onto a mesh without first landing everything on one device. Each family is two tables
(llm/convert/table.py): what it does with every ModelConfig field, and which of our params
are which HF tensors. Anything the other side cannot express raises a ConversionError (a
ValueError) naming the field, and a tensor or param left over on either side raises too,
rather than producing a model whose logits silently differ.

Directories are read from safetensors only: PyTorch pickles (pytorch_model.bin) can run
code when loaded, so they are read only with allow_pickle=True. Shards named by an index
must lie in the checkpoint's own directory.
"""

from __future__ import annotations

import json
import os
from typing import Any

from llm.config import ModelConfig
from llm.convert import bart, bert, bloom, gpt2, llama, mixtral, t5, table
from llm.convert.common import (ConversionError, numpy_state_to_torch, params_to_numpy,
                                read_safetensors_dir, refuse_pickles, require,
                                require_hf_libraries, torch_state_to_numpy)

# model_type -> family module (or object with the same functions). Order is
# to_transformers' preference among families that express a config.
# A family defines MODEL_TYPE, FIELDS (a table.Fields), config_from_hf(hf_config,
# scan_layers), config_to_hf(cfg), params_from_hf(state, cfg) and state_to_hf(cfg, params)
# (its tensor table run by table.params_from_hf / params_to_hf), model_class(); and may
# define:
#   LLM_FAMILY                 the ModelConfig.family it converts ("decoder" if absent);
#   hf_model(cfg, state)       the HF model to load `state` into, when the class depends on
#                              which heads the params hold (default: model_class()(config));
#   model_class_for(hf_config) the class a torch-only checkpoint is read with.
FAMILIES = {gpt2.MODEL_TYPE: gpt2, llama.MODEL_TYPE: llama, bert.BERT.MODEL_TYPE: bert.BERT,
            bert.ROBERTA.MODEL_TYPE: bert.ROBERTA, bloom.MODEL_TYPE: bloom,
            mixtral.MODEL_TYPE: mixtral, t5.MODEL_TYPE: t5, bart.MODEL_TYPE: bart}

__all__ = ["ConversionError", "FAMILIES", "from_transformers", "load_pretrained",
           "save_pretrained", "to_transformers"]


def _family(model_type: str):
  require(model_type in FAMILIES, f"model_type={model_type!r} is not supported; supported "
          f"model types: {', '.join(FAMILIES)}")
  return FAMILIES[model_type]


def from_transformers(model_or_dir: Any, scan_layers: bool = True, allow_pickle: bool = False):
  """(ModelConfig, params) from a transformers model object or a saved directory."""
  if isinstance(model_or_dir, (str, os.PathLike)):
    return load_pretrained(model_or_dir, scan_layers=scan_layers, allow_pickle=allow_pickle)
  hf_config = model_or_dir.config
  family = _family(hf_config.model_type)
  cfg = family.config_from_hf(hf_config, scan_layers)  # config errors before touching weights
  return cfg, family.params_from_hf(torch_state_to_numpy(model_or_dir.state_dict()), cfg)


def load_pretrained(directory: str | os.PathLike, scan_layers: bool = True,
                    allow_pickle: bool = False):
  """from_transformers for a local directory; safetensors are read without torch.

  A directory with only PyTorch pickles (pytorch_model.bin) is refused unless
  `allow_pickle`: unpickling can run code, so only allow checkpoints you trust.
  """
  directory = os.fspath(directory)
  require(os.path.isfile(os.path.join(directory, "config.json")), f"{directory} has no "
          "config.json: not a Hugging Face checkpoint directory")
  with open(os.path.join(directory, "config.json")) as f:
    family = _family(json.load(f).get("model_type"))
  require_hf_libraries("transformers")
  from transformers import AutoConfig
  # config.json stores only non-default fields, so the config class fills in the rest.
  hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
  cfg = family.config_from_hf(hf_config, scan_layers)
  state = read_safetensors_dir(directory)
  if state is None:  # a pytorch_model.bin-only checkpoint: let transformers read it
    refuse_pickles(directory, allow_pickle)
    model_class_for = getattr(family, "model_class_for", lambda _: family.model_class())
    model = model_class_for(hf_config).from_pretrained(directory, local_files_only=True)
    state = torch_state_to_numpy(model.state_dict())
  return cfg, family.params_from_hf(state, cfg)


def _llm_family(family) -> str:
  return getattr(family, "LLM_FAMILY", "decoder")


def _hf_problems(family, cfg: ModelConfig) -> list[str]:
  return table.problems(family.MODEL_TYPE, family.FIELDS, cfg)


def _pick_family(cfg: ModelConfig, model_type: str | None):
  candidates = {name: f for name, f in FAMILIES.items() if _llm_family(f) == cfg.family}
  require(bool(candidates), f"config.model.family={cfg.family!r}: only "
          f"{' and '.join(sorted({_llm_family(f) for f in FAMILIES.values()}))} families "
          "convert to transformers so far")
  if model_type is not None:
    family = _family(model_type)
    require(_llm_family(family) == cfg.family, f"{model_type} is a {_llm_family(family)} "
            f"family; config.model.family={cfg.family!r}")
    table.check(model_type, family.FIELDS, cfg)
    return family
  reasons = {}
  for name, family in candidates.items():
    reasons[name] = _hf_problems(family, cfg)
    if not reasons[name]:
      return family
  raise ConversionError("no transformers family expresses config.model: " + " | ".join(
      f"{name}: {'; '.join(why)}" for name, why in reasons.items()))


def to_transformers(cfg: ModelConfig, params: Any, model_type: str | None = None):
  """A float32 torch transformers model in eval mode holding `params`.

  The family is the first in FAMILIES of cfg.family that can express `cfg`, or
  `model_type` if given.
  """
  require_hf_libraries("transformers", "torch")
  family = _pick_family(cfg, model_type)
  state = family.state_to_hf(cfg, params_to_numpy(params))
  hf_model = getattr(family, "hf_model", None)
  model = (hf_model(cfg, state) if hf_model is not None
           else family.model_class()(family.config_to_hf(cfg)))
  # strict: a missing or extra tensor would leave HF's random init in place unnoticed.
  model.load_state_dict(numpy_state_to_torch(state), strict=True)
  return model.float().eval()


def save_pretrained(cfg: ModelConfig, params: Any, out_dir: str | os.PathLike,
                    model_type: str | None = None) -> str:
  """Writes a transformers checkpoint (config.json + model.safetensors) to `out_dir`."""
  out_dir = os.fspath(out_dir)
  to_transformers(cfg, params, model_type).save_pretrained(out_dir)
  return out_dir
