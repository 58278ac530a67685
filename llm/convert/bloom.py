"""BLOOM (BloomForCausalLM / BloomModel) <-> llm decoder with ALiBi, LayerNorm after the
token embedding, LayerNorm blocks with biases, tanh-GELU MLP of width 4 d_model.

Fused attention. `query_key_value` (3D, D) is laid out per head: its output rows viewed
as (N, 3, H) are [q_h, k_h, v_h] for each head h (`BloomAttention._reshape`), not three
D-row blocks as in GPT-2's c_attn.

ALiBi. HF adds slope_n * (number of real tokens before key s) to the logits; ours adds
slope_n * s (the key's slot). Within one query row the two differ by a constant, which
softmax ignores, so logits agree with or without (left) padding when segment_ids =
attention_mask.

max_len. BLOOM has no position table, so nothing in the checkpoint bounds the context;
we take config `seq_length` when a checkpoint carries one (some BLOOM configs do) and
otherwise BLOOM's training context, 2048. With ALiBi max_len bounds nothing in the model
itself; to_transformers writes it back as `seq_length`.

Ignored (no effect on eval logits): hidden_dropout / attention_dropout, pretraining_tp
without slow_but_exact (HF then runs plain Linear layers), n_inner and the other Megatron
fields old configs carry (BloomMLP is always 4 * hidden_size wide).
Rejected: apply_residual_connection_post_layernorm=True (the residual is the normed
input; our blocks always add to the unnormed stream) and slow_but_exact=True with
pretraining_tp > 1 (HF then sums per-slice F.linear without the `dense` and
`dense_4h_to_h` biases, which our layers always add).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm.config import ModelConfig
from llm.convert import table as t
from llm.convert.common import Params, State, add_prefix, hf_field, reject_if, require

MODEL_TYPE = "bloom"
DEFAULT_MAX_LEN = 2048  # BLOOM's training context, used when the config has no seq_length

FIELDS = t.Fields(
    fixed={"family": "decoder", "positions": "alibi", "embed_norm": True, "norm": "layernorm",
           "use_bias": True, "activation": "gelu", "post_norm": False, "scale_attention": True},
    rules=(t.DENSE, t.NO_GQA, t.HEAD_DIM,
           t.Rule("d_ff", lambda c: c.d_ff == 4 * c.d_model, "4 * d_model")),
    carried=("vocab_size", "d_model", "num_layers", "num_heads", "max_len", "norm_eps",
             "tie_embeddings"),
    unused=("rope_theta", "num_decoder_layers", "type_vocab_size", "position_offset",
            "relative_buckets", "relative_max_distance", *t.MOE_KNOBS))


def config_from_hf(hf: Any, scan_layers: bool) -> ModelConfig:
  reject_if(hf, MODEL_TYPE, "apply_residual_connection_post_layernorm", bool,
            "llm blocks add each sublayer to the unnormalized residual stream")
  tp = hf_field(hf, "pretraining_tp", 1) or 1
  require(not (hf_field(hf, "slow_but_exact", False) and tp > 1),
          f"bloom config.slow_but_exact=True with config.pretraining_tp={tp} is not "
          "supported: HF then drops the biases of self_attention.dense and "
          "mlp.dense_4h_to_h, which llm layers always add")
  d, n = hf.hidden_size, hf.n_head
  require(d % n == 0, f"bloom config.hidden_size={d} is not divisible by config.n_head={n}")
  return t.build_config(
      MODEL_TYPE, FIELDS, vocab_size=hf.vocab_size, d_model=d, num_layers=hf.n_layer,
      num_heads=n, num_kv_heads=n, head_dim=d // n, d_ff=4 * d,
      max_len=int(hf_field(hf, "seq_length", None) or DEFAULT_MAX_LEN),
      norm_eps=float(hf.layer_norm_epsilon),
      tie_embeddings=bool(hf_field(hf, "tie_word_embeddings", True)), dropout=0.0,
      scan_layers=scan_layers)


def tensors(cfg: ModelConfig) -> list[t.Entry]:
  d, n, h, f = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff
  qkv = ("attn/query", "attn/key", "attn/value")
  # torch (3D, D) rows viewed as (N, 3, H): the per-head [q, k, v] interleaving.
  block = [
      *t.norm("attn_norm", "input_layernorm"),
      t.Tensor(tuple(f"{p}/kernel" for p in qkv), ("self_attention.query_key_value.weight",),
               lambda w: tuple(np.moveaxis(w.T.reshape(d, n, 3, h), 2, 0)),
               lambda *ks: (np.stack(ks, axis=2).reshape(d, 3 * d).T,)),
      t.Tensor(tuple(f"{p}/bias" for p in qkv), ("self_attention.query_key_value.bias",),
               lambda b: tuple(np.moveaxis(b.reshape(n, 3, h), 1, 0)),
               lambda *bs: (np.stack(bs, axis=1).reshape(3 * d),)),
      *t.linear("attn/out", "self_attention.dense", (n, h), (d,), bias=True),
      *t.norm("mlp_norm", "post_attention_layernorm"),
      *t.linear("mlp/wi", "mlp.dense_h_to_4h", (d,), (f,), bias=True),
      *t.linear("mlp/wo", "mlp.dense_4h_to_h", (f,), (d,), bias=True),
  ]
  return [*t.embedding_and_head(cfg, "transformer.word_embeddings.weight"),
          *t.norm("embed_norm", "transformer.word_embeddings_layernorm"),
          *t.per_layer(cfg.num_layers, "transformer.h.{i}", block),
          *t.norm("final_norm", "transformer.ln_f")]


def params_from_hf(state: State, cfg: ModelConfig) -> Params:
  # The hub's BLOOM checkpoints are saved from BloomModel, without the "transformer." prefix.
  state = add_prefix(state, "transformer.", marker="transformer.")
  return t.params_from_hf(tensors(cfg), state, MODEL_TYPE, cfg.scan_layers)


def state_to_hf(cfg: ModelConfig, params: Params) -> State:
  return t.params_to_hf(tensors(cfg), params, MODEL_TYPE)


def model_class():
  from transformers import BloomForCausalLM
  return BloomForCausalLM


def config_to_hf(cfg: ModelConfig):
  from transformers import BloomConfig
  # seq_length is not a BloomConfig field; it rides along in config.json so that the
  # context we trained for survives a round trip (config_from_hf reads it back).
  return BloomConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, n_layer=cfg.num_layers,
      n_head=cfg.num_heads, layer_norm_epsilon=cfg.norm_eps,
      hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout,
      tie_word_embeddings=cfg.tie_embeddings, seq_length=cfg.max_len)
