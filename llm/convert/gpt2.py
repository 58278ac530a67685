"""GPT-2 (GPT2LMHeadModel) <-> llm decoder with learned positions, LayerNorm, biases.

HF GPT-2 uses Conv1D, whose weight is (in, out) like our kernels, so no transposes; the
fused c_attn (D, 3D) splits into query/key/value in that order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm.config import ModelConfig, validate_model
from llm.convert.common import (Params, State, StateReader, add_prefix, hf_field, reject_if,
                                require, stack_layers, unstack_layers)

MODEL_TYPE = "gpt2"

# HF activation name -> ours. gelu_new and gelu_pytorch_tanh are both the tanh approximation.
_ACT_FROM_HF = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact",
                "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}

# Causal-mask buffers that older checkpoints (including the hub's gpt2) still store.
_IGNORE = (r"\.attn\.bias$", r"\.attn\.masked_bias$")


def config_from_hf(hf: Any, scan_layers: bool) -> ModelConfig:
  act = hf_field(hf, "activation_function")
  require(act in _ACT_FROM_HF, f"gpt2 config.activation_function={act!r} is not supported; "
          f"supported: {', '.join(_ACT_FROM_HF)}")
  reject_if(hf, MODEL_TYPE, "scale_attn_weights", lambda v: v is False,
            "llm attention always scales logits by 1/sqrt(head_dim)")
  reject_if(hf, MODEL_TYPE, "scale_attn_by_inverse_layer_idx", bool,
            "llm attention has no per-layer logit scale")
  reject_if(hf, MODEL_TYPE, "add_cross_attention", bool,
            "llm decoder blocks are self-attention only")
  d, n = hf.n_embd, hf.n_head
  require(d % n == 0, f"gpt2 config.n_embd={d} is not divisible by config.n_head={n}")
  return validate_model(ModelConfig(
      family="decoder", vocab_size=hf.vocab_size, d_model=d, num_layers=hf.n_layer,
      num_heads=n, num_kv_heads=n, head_dim=d // n, d_ff=hf.n_inner or 4 * d,
      max_len=hf.n_positions, positions="learned", norm="layernorm",
      norm_eps=float(hf.layer_norm_epsilon), activation=_ACT_FROM_HF[act], use_bias=True,
      tie_embeddings=bool(hf_field(hf, "tie_word_embeddings", True)), dropout=0.0,
      scan_layers=scan_layers))


def _norm_from_hf(get, name: str) -> Params:
  return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}


def _block_from_hf(get, cfg: ModelConfig, i: int) -> Params:
  p = f"transformer.h.{i}"
  d, n, h = cfg.d_model, cfg.num_heads, cfg.dim_per_head
  qkv_w = np.split(get(f"{p}.attn.c_attn.weight"), 3, axis=1)
  qkv_b = np.split(get(f"{p}.attn.c_attn.bias"), 3)
  attn = {name: {"kernel": w.reshape(d, n, h), "bias": b.reshape(n, h)}
          for name, w, b in zip(("query", "key", "value"), qkv_w, qkv_b)}
  attn["out"] = {"kernel": get(f"{p}.attn.c_proj.weight").reshape(n, h, d),
                 "bias": get(f"{p}.attn.c_proj.bias")}
  mlp = {"wi": {"kernel": get(f"{p}.mlp.c_fc.weight"), "bias": get(f"{p}.mlp.c_fc.bias")},
         "wo": {"kernel": get(f"{p}.mlp.c_proj.weight"), "bias": get(f"{p}.mlp.c_proj.bias")}}
  return {"attn_norm": _norm_from_hf(get, f"{p}.ln_1"), "attn": attn,
          "mlp_norm": _norm_from_hf(get, f"{p}.ln_2"), "mlp": mlp}


def params_from_hf(state: State, cfg: ModelConfig) -> Params:
  state = add_prefix(state, "transformer.", marker="transformer.")
  # A tied checkpoint may or may not carry the lm_head copy; either way it is wte.
  ignore = _IGNORE + ((r"^lm_head\.weight$",) if cfg.tie_embeddings else ())
  get = StateReader(state, MODEL_TYPE, ignore)
  params = {"embed": {"embedding": get("transformer.wte.weight")},
            "pos_embed": {"embedding": get("transformer.wpe.weight")},
            **stack_layers([_block_from_hf(get, cfg, i) for i in range(cfg.num_layers)],
                           cfg.scan_layers),
            "final_norm": _norm_from_hf(get, "transformer.ln_f")}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": get("lm_head.weight").T}
  get.finish()
  return params


def hf_problems(cfg: ModelConfig) -> list[str]:
  """Why GPT-2 cannot express `cfg` (empty when it can)."""
  checks = [
      (cfg.positions == "learned", f"positions={cfg.positions!r} (gpt2 needs 'learned')"),
      (cfg.norm == "layernorm", f"norm={cfg.norm!r} (gpt2 needs 'layernorm')"),
      (cfg.use_bias, "use_bias=False (gpt2 always has biases)"),
      (cfg.activation in _ACT_TO_HF, f"activation={cfg.activation!r} (gpt2 supports "
                                     f"{', '.join(_ACT_TO_HF)})"),
      (cfg.kv_heads == cfg.num_heads, f"num_kv_heads={cfg.num_kv_heads} (gpt2 has no GQA)"),
      (cfg.dim_per_head * cfg.num_heads == cfg.d_model,
       f"head_dim={cfg.head_dim} (gpt2 needs d_model / num_heads)"),
  ]
  return [why for ok, why in checks if not ok]


def model_class():
  from transformers import GPT2LMHeadModel
  return GPT2LMHeadModel


def config_to_hf(cfg: ModelConfig):
  from transformers import GPT2Config
  # GPT-2's default special ids (50256) are invalid in a smaller vocab; the tokenizer,
  # not the model config, owns them in llm.
  special = None if cfg.vocab_size <= 50256 else 50256
  return GPT2Config(
      vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.d_model,
      n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff,
      activation_function=_ACT_TO_HF[cfg.activation], layer_norm_epsilon=cfg.norm_eps,
      resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
      tie_word_embeddings=cfg.tie_embeddings, bos_token_id=special, eos_token_id=special)


def _norm_to_hf(name: str, p: Params) -> State:
  return {f"{name}.weight": p["scale"], f"{name}.bias": p["bias"]}


def _block_to_hf(cfg: ModelConfig, i: int, b: Params) -> State:
  p = f"transformer.h.{i}"
  d = cfg.d_model
  a = b["attn"]
  qkv = ("query", "key", "value")
  return {
      **_norm_to_hf(f"{p}.ln_1", b["attn_norm"]),
      f"{p}.attn.c_attn.weight": np.concatenate([a[k]["kernel"].reshape(d, d) for k in qkv], 1),
      f"{p}.attn.c_attn.bias": np.concatenate([a[k]["bias"].reshape(d) for k in qkv]),
      f"{p}.attn.c_proj.weight": a["out"]["kernel"].reshape(d, d),
      f"{p}.attn.c_proj.bias": a["out"]["bias"],
      **_norm_to_hf(f"{p}.ln_2", b["mlp_norm"]),
      f"{p}.mlp.c_fc.weight": b["mlp"]["wi"]["kernel"],
      f"{p}.mlp.c_fc.bias": b["mlp"]["wi"]["bias"],
      f"{p}.mlp.c_proj.weight": b["mlp"]["wo"]["kernel"],
      f"{p}.mlp.c_proj.bias": b["mlp"]["wo"]["bias"],
  }


def state_to_hf(cfg: ModelConfig, params: Params) -> State:
  state = {"transformer.wte.weight": params["embed"]["embedding"],
           "transformer.wpe.weight": params["pos_embed"]["embedding"],
           **_norm_to_hf("transformer.ln_f", params["final_norm"])}
  for i, block in enumerate(unstack_layers(params, cfg.num_layers)):
    state.update(_block_to_hf(cfg, i, block))
  state["lm_head.weight"] = (params["embed"]["embedding"] if cfg.tie_embeddings
                             else params["lm_head"]["kernel"].T)
  return state
