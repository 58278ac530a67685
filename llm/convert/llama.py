"""LLaMA (LlamaForCausalLM) <-> llm decoder with RoPE, RMSNorm, gated MLP, GQA.

torch Linear weights are (out, in), so every projection is transposed; q/k need no
permutation because our RoPE uses the same "rotate half" pairing as HF LLaMA.
"""

from __future__ import annotations

from typing import Any

from llm.config import ModelConfig, validate_model
from llm.convert.common import (Params, State, StateReader, add_prefix, hf_field, require,
                                stack_layers, unstack_layers)

MODEL_TYPE = "llama"

# Our gated MLPs: act(x W_gate) * (x W_up). geglu uses the tanh-approximate GELU.
_ACT_FROM_HF = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
_ACT_TO_HF = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}

# Old checkpoints stored the RoPE frequencies; we recompute them from rope_theta.
_IGNORE = (r"rotary_emb\.inv_freq$",)


def _rope_theta(hf: Any) -> float:
  """rope_theta from `rope_parameters` (transformers 5) or the older flat fields."""
  rope = dict(hf_field(hf, "rope_parameters") or hf_field(hf, "rope_scaling") or {})
  kind = rope.get("rope_type", rope.get("type", "default"))
  require(kind == "default", f"llama config.rope_parameters (rope_scaling) rope_type={kind!r} "
          "is not supported: llm RoPE has no frequency scaling (only 'default')")
  return float(rope.get("rope_theta", hf_field(hf, "rope_theta", 10000.0)))


def _use_bias(hf: Any) -> bool:
  # Our use_bias switches every linear bias together; RMSNorm has none either way.
  attn, mlp = bool(hf_field(hf, "attention_bias", False)), bool(hf_field(hf, "mlp_bias", False))
  require(attn == mlp, f"llama config.attention_bias={attn} with config.mlp_bias={mlp} is not "
          "supported: llm's use_bias turns attention and MLP biases on together")
  return attn


def config_from_hf(hf: Any, scan_layers: bool) -> ModelConfig:
  act = hf_field(hf, "hidden_act")
  require(act in _ACT_FROM_HF, f"llama config.hidden_act={act!r} is not supported; "
          f"supported: {', '.join(_ACT_FROM_HF)}")
  n = hf.num_attention_heads
  return validate_model(ModelConfig(
      family="decoder", vocab_size=hf.vocab_size, d_model=hf.hidden_size,
      num_layers=hf.num_hidden_layers, num_heads=n,
      num_kv_heads=hf_field(hf, "num_key_value_heads") or n,
      head_dim=hf_field(hf, "head_dim") or hf.hidden_size // n, d_ff=hf.intermediate_size,
      max_len=hf.max_position_embeddings, positions="rope", rope_theta=_rope_theta(hf),
      norm="rmsnorm", norm_eps=float(hf.rms_norm_eps), activation=_ACT_FROM_HF[act],
      use_bias=_use_bias(hf), tie_embeddings=bool(hf_field(hf, "tie_word_embeddings", False)),
      dropout=0.0, scan_layers=scan_layers))


def _linear_from_hf(get, name: str, in_shape: tuple, out_shape: tuple, bias: bool) -> Params:
  p = {"kernel": get(f"{name}.weight").T.reshape(*in_shape, *out_shape)}
  if bias:
    p["bias"] = get(f"{name}.bias").reshape(out_shape)
  return p


def _block_from_hf(get, cfg: ModelConfig, i: int) -> Params:
  p = f"model.layers.{i}"
  d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_ff
  lin = lambda name, i_shape, o_shape: _linear_from_hf(get, f"{p}.{name}", i_shape, o_shape,
                                                        cfg.use_bias)
  return {
      "attn_norm": {"scale": get(f"{p}.input_layernorm.weight")},
      "attn": {"query": lin("self_attn.q_proj", (d,), (n, h)),
               "key": lin("self_attn.k_proj", (d,), (k, h)),
               "value": lin("self_attn.v_proj", (d,), (k, h)),
               "out": lin("self_attn.o_proj", (n, h), (d,))},
      "mlp_norm": {"scale": get(f"{p}.post_attention_layernorm.weight")},
      "mlp": {"wi_gate": lin("mlp.gate_proj", (d,), (f,)), "wi_up": lin("mlp.up_proj", (d,), (f,)),
              "wo": lin("mlp.down_proj", (f,), (d,))},
  }


def params_from_hf(state: State, cfg: ModelConfig) -> Params:
  return llama_style_params(state, cfg, _block_from_hf, MODEL_TYPE, _IGNORE)


def llama_style_params(state: State, cfg: ModelConfig, block_from_hf, model_type: str,
                       ignore: tuple) -> Params:
  """Embeddings, blocks (mapped by `block_from_hf`), final norm and head of a LLaMA-layout
  checkpoint ("model.embed_tokens", "model.layers.i", "model.norm", "lm_head")."""
  state = add_prefix(state, "model.", marker="model.")
  ignore = ignore + ((r"^lm_head\.weight$",) if cfg.tie_embeddings else ())
  get = StateReader(state, model_type, ignore)
  params = {"embed": {"embedding": get("model.embed_tokens.weight")},
            **stack_layers([block_from_hf(get, cfg, i) for i in range(cfg.num_layers)],
                           cfg.scan_layers),
            "final_norm": {"scale": get("model.norm.weight")}}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": get("lm_head.weight").T}
  get.finish()
  return params


def hf_problems(cfg: ModelConfig) -> list[str]:
  """Why LLaMA cannot express `cfg` (empty when it can)."""
  checks = [
      (cfg.positions == "rope", f"positions={cfg.positions!r} (llama needs 'rope')"),
      (cfg.norm == "rmsnorm", f"norm={cfg.norm!r} (llama needs 'rmsnorm')"),
      (cfg.activation in _ACT_TO_HF, f"activation={cfg.activation!r} (llama supports "
                                     f"{', '.join(_ACT_TO_HF)})"),
      # LlamaConfig rejects such configs even though head_dim would make them well defined.
      (cfg.d_model % cfg.num_heads == 0,
       f"d_model={cfg.d_model} not divisible by num_heads={cfg.num_heads} (llama requires it)"),
  ]
  return [why for ok, why in checks if not ok]


def model_class():
  from transformers import LlamaForCausalLM
  return LlamaForCausalLM


def config_to_hf(cfg: ModelConfig):
  from transformers import LlamaConfig
  return LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
      hidden_act=_ACT_TO_HF[cfg.activation], max_position_embeddings=cfg.max_len,
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias, attention_dropout=cfg.dropout)


def _block_to_hf(cfg: ModelConfig, i: int, b: Params) -> State:
  p = f"model.layers.{i}"
  d, f = cfg.d_model, cfg.d_ff
  nh, kh = cfg.num_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
  a, m = b["attn"], b["mlp"]
  # (llm module, HF name, flattened in size, flattened out size)
  layout = [(a["query"], "self_attn.q_proj", d, nh), (a["key"], "self_attn.k_proj", d, kh),
            (a["value"], "self_attn.v_proj", d, kh), (a["out"], "self_attn.o_proj", nh, d),
            (m["wi_gate"], "mlp.gate_proj", d, f), (m["wi_up"], "mlp.up_proj", d, f),
            (m["wo"], "mlp.down_proj", f, d)]
  state = {f"{p}.input_layernorm.weight": b["attn_norm"]["scale"],
           f"{p}.post_attention_layernorm.weight": b["mlp_norm"]["scale"]}
  for module, name, size_in, size_out in layout:
    state[f"{p}.{name}.weight"] = module["kernel"].reshape(size_in, size_out).T
    if cfg.use_bias:
      state[f"{p}.{name}.bias"] = module["bias"].reshape(size_out)
  return state


def state_to_hf(cfg: ModelConfig, params: Params) -> State:
  state = {"model.embed_tokens.weight": params["embed"]["embedding"],
           "model.norm.weight": params["final_norm"]["scale"]}
  for i, block in enumerate(unstack_layers(params, cfg.num_layers)):
    state.update(_block_to_hf(cfg, i, block))
  state["lm_head.weight"] = (params["embed"]["embedding"] if cfg.tie_embeddings
                             else params["lm_head"]["kernel"].T)
  return state
