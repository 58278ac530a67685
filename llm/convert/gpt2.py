"""GPT-2 (GPT2LMHeadModel) <-> llm decoder with learned positions, LayerNorm, biases.

HF GPT-2 uses Conv1D, whose weight is (in, out) like our kernels, so no transposes; the
fused c_attn (D, 3D) splits into query/key/value in that order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm.config import ModelConfig
from llm.convert import table as t
from llm.convert.common import (Params, State, add_prefix, hf_field, reject_if, require)

MODEL_TYPE = "gpt2"

# HF activation name -> ours. gelu_new and gelu_pytorch_tanh are both the tanh approximation.
_ACT_FROM_HF = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact",
                "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}

FIELDS = t.Fields(
    fixed={"family": "decoder", "positions": "learned", "norm": "layernorm", "use_bias": True,
           "post_norm": False, "embed_norm": False, "scale_attention": True},
    allowed={"activation": tuple(_ACT_TO_HF)},
    rules=(t.DENSE, t.NO_GQA, t.HEAD_DIM),
    carried=("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len",
             "norm_eps", "tie_embeddings"),
    # A decoder reads neither position_offset nor type_vocab_size.
    unused=("rope_theta", "num_decoder_layers", "type_vocab_size", "position_offset",
            "relative_buckets", "relative_max_distance", *t.MOE_KNOBS))

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
  return t.build_config(
      MODEL_TYPE, FIELDS, vocab_size=hf.vocab_size, d_model=d, num_layers=hf.n_layer,
      num_heads=n, num_kv_heads=n, head_dim=d // n, d_ff=hf.n_inner or 4 * d,
      max_len=hf.n_positions, norm_eps=float(hf.layer_norm_epsilon),
      activation=_ACT_FROM_HF[act],
      tie_embeddings=bool(hf_field(hf, "tie_word_embeddings", True)), dropout=0.0,
      scan_layers=scan_layers)


def tensors(cfg: ModelConfig) -> list[t.Entry]:
  d, n, h, f = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff
  qkv = ("attn/query", "attn/key", "attn/value")
  block = [
      *t.norm("attn_norm", "ln_1"),
      t.Tensor(tuple(f"{p}/kernel" for p in qkv), ("attn.c_attn.weight",),
               lambda w: tuple(x.reshape(d, n, h) for x in np.split(w, 3, axis=1)),
               lambda *ks: (np.concatenate([k.reshape(d, d) for k in ks], axis=1),)),
      t.Tensor(tuple(f"{p}/bias" for p in qkv), ("attn.c_attn.bias",),
               lambda b: tuple(x.reshape(n, h) for x in np.split(b, 3)),
               lambda *bs: (np.concatenate([b.reshape(d) for b in bs]),)),
      *t.linear("attn/out", "attn.c_proj", (n, h), (d,), bias=True, conv1d=True),
      *t.norm("mlp_norm", "ln_2"),
      *t.linear("mlp/wi", "mlp.c_fc", (d,), (f,), bias=True, conv1d=True),
      *t.linear("mlp/wo", "mlp.c_proj", (f,), (d,), bias=True, conv1d=True),
  ]
  return [*t.embedding_and_head(cfg, "transformer.wte.weight"),
          *t.same("pos_embed/embedding", "transformer.wpe.weight"),
          *t.per_layer(cfg.num_layers, "transformer.h.{i}", block),
          *t.norm("final_norm", "transformer.ln_f")]


def params_from_hf(state: State, cfg: ModelConfig) -> Params:
  state = add_prefix(state, "transformer.", marker="transformer.")
  return t.params_from_hf(tensors(cfg), state, MODEL_TYPE, cfg.scan_layers, _IGNORE)


def state_to_hf(cfg: ModelConfig, params: Params) -> State:
  return t.params_to_hf(tensors(cfg), params, MODEL_TYPE)


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
