"""LLaMA (LlamaForCausalLM) <-> llm decoder with RoPE, RMSNorm, gated MLP, GQA.

torch Linear weights are (out, in), so every projection is transposed; q/k need no
permutation because our RoPE uses the same "rotate half" pairing as HF LLaMA.
"""

from __future__ import annotations

from typing import Any

from llm.config import ModelConfig
from llm.convert import table as t
from llm.convert.common import (Params, State, add_prefix, default_rope_theta, hf_field,
                                require)

MODEL_TYPE = "llama"

# Our gated MLPs: act(x W_gate) * (x W_up). geglu uses the tanh-approximate GELU.
_ACT_FROM_HF = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
_ACT_TO_HF = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}

FIELDS = t.Fields(
    fixed={"family": "decoder", "positions": "rope", "norm": "rmsnorm", "post_norm": False,
           "embed_norm": False, "scale_attention": True},
    allowed={"activation": tuple(_ACT_TO_HF)},
    # LlamaConfig rejects such d_model even though head_dim would make it well defined.
    rules=(t.DENSE, t.Rule("d_model", lambda c: c.d_model % c.num_heads == 0,
                           "a multiple of num_heads (LlamaConfig requires it)")),
    carried=("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "d_ff", "max_len", "rope_theta", "norm_eps", "use_bias", "tie_embeddings"),
    unused=("num_decoder_layers", "type_vocab_size", "position_offset", "relative_buckets",
            "relative_max_distance", *t.MOE_KNOBS))

# Old checkpoints stored the RoPE frequencies; we recompute them from rope_theta.
IGNORE = (r"rotary_emb\.inv_freq$",)


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
  return t.build_config(
      MODEL_TYPE, FIELDS, vocab_size=hf.vocab_size, d_model=hf.hidden_size,
      num_layers=hf.num_hidden_layers, num_heads=n,
      num_kv_heads=hf_field(hf, "num_key_value_heads") or n,
      head_dim=hf_field(hf, "head_dim") or hf.hidden_size // n, d_ff=hf.intermediate_size,
      max_len=hf.max_position_embeddings, rope_theta=default_rope_theta(hf, MODEL_TYPE),
      norm_eps=float(hf.rms_norm_eps), activation=_ACT_FROM_HF[act], use_bias=_use_bias(hf),
      tie_embeddings=bool(hf_field(hf, "tie_word_embeddings", False)), dropout=0.0,
      scan_layers=scan_layers)


def attention(cfg: ModelConfig) -> list[t.Entry]:
  """A LLaMA-layout block's norms and attention (Mixtral's too)."""
  d, n, k, h, b = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.use_bias
  return [*t.norm("attn_norm", "input_layernorm", bias=False),
          *t.linear("attn/query", "self_attn.q_proj", (d,), (n, h), b),
          *t.linear("attn/key", "self_attn.k_proj", (d,), (k, h), b),
          *t.linear("attn/value", "self_attn.v_proj", (d,), (k, h), b),
          *t.linear("attn/out", "self_attn.o_proj", (n, h), (d,), b),
          *t.norm("mlp_norm", "post_attention_layernorm", bias=False)]


def outside_blocks(cfg: ModelConfig) -> list[t.Entry]:
  """Embedding, final norm and head of a LLaMA-layout checkpoint ("model.*", "lm_head")."""
  return [*t.embedding_and_head(cfg, "model.embed_tokens.weight"),
          *t.norm("final_norm", "model.norm", bias=False)]


def tensors(cfg: ModelConfig) -> list[t.Entry]:
  d, f, b = cfg.d_model, cfg.d_ff, cfg.use_bias
  block = [*attention(cfg),
           *t.linear("mlp/wi_gate", "mlp.gate_proj", (d,), (f,), b),
           *t.linear("mlp/wi_up", "mlp.up_proj", (d,), (f,), b),
           *t.linear("mlp/wo", "mlp.down_proj", (f,), (d,), b)]
  return [*outside_blocks(cfg), *t.per_layer(cfg.num_layers, "model.layers.{i}", block)]


def params_from_hf(state: State, cfg: ModelConfig) -> Params:
  state = add_prefix(state, "model.", marker="model.")
  return t.params_from_hf(tensors(cfg), state, MODEL_TYPE, cfg.scan_layers, IGNORE)


def state_to_hf(cfg: ModelConfig, params: Params) -> State:
  return t.params_to_hf(tensors(cfg), params, MODEL_TYPE)


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
