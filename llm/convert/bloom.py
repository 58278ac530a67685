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

from llm.config import ModelConfig, validate_model
from llm.convert.common import (Params, State, StateReader, add_prefix, hf_field,
                                linear_from_torch, linear_to_torch, reject_if, require,
                                stack_layers, unstack_layers)

MODEL_TYPE = "bloom"
DEFAULT_MAX_LEN = 2048  # BLOOM's training context, used when the config has no seq_length


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
  return validate_model(ModelConfig(
      family="decoder", vocab_size=hf.vocab_size, d_model=d, num_layers=hf.n_layer,
      num_heads=n, num_kv_heads=n, head_dim=d // n, d_ff=4 * d,
      max_len=int(hf_field(hf, "seq_length", None) or DEFAULT_MAX_LEN), positions="alibi",
      norm="layernorm", norm_eps=float(hf.layer_norm_epsilon), activation="gelu",
      use_bias=True, embed_norm=True,
      tie_embeddings=bool(hf_field(hf, "tie_word_embeddings", True)), dropout=0.0,
      scan_layers=scan_layers))


def _norm_from_hf(get, name: str) -> Params:
  return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}


def _norm_to_hf(name: str, p: Params) -> State:
  return {f"{name}.weight": p["scale"], f"{name}.bias": p["bias"]}


def _block_from_hf(get, cfg: ModelConfig, i: int) -> Params:
  p = f"transformer.h.{i}"
  d, n, h, f = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff
  qkv_w = get(f"{p}.self_attention.query_key_value.weight").T.reshape(d, n, 3, h)
  qkv_b = get(f"{p}.self_attention.query_key_value.bias").reshape(n, 3, h)
  attn = {name: {"kernel": qkv_w[:, :, j], "bias": qkv_b[:, j]}
          for j, name in enumerate(("query", "key", "value"))}
  attn["out"] = linear_from_torch(get, f"{p}.self_attention.dense", (n, h), (d,), bias=True)
  mlp = {"wi": linear_from_torch(get, f"{p}.mlp.dense_h_to_4h", (d,), (f,), bias=True),
         "wo": linear_from_torch(get, f"{p}.mlp.dense_4h_to_h", (f,), (d,), bias=True)}
  return {"attn_norm": _norm_from_hf(get, f"{p}.input_layernorm"), "attn": attn,
          "mlp_norm": _norm_from_hf(get, f"{p}.post_attention_layernorm"), "mlp": mlp}


def params_from_hf(state: State, cfg: ModelConfig) -> Params:
  # The hub's BLOOM checkpoints are saved from BloomModel, without the "transformer." prefix.
  state = add_prefix(state, "transformer.", marker="transformer.")
  ignore = (r"^lm_head\.weight$",) if cfg.tie_embeddings else ()
  get = StateReader(state, MODEL_TYPE, ignore)
  params = {"embed": {"embedding": get("transformer.word_embeddings.weight")},
            "embed_norm": _norm_from_hf(get, "transformer.word_embeddings_layernorm"),
            **stack_layers([_block_from_hf(get, cfg, i) for i in range(cfg.num_layers)],
                           cfg.scan_layers),
            "final_norm": _norm_from_hf(get, "transformer.ln_f")}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": get("lm_head.weight").T}
  get.finish()
  return params


def hf_problems(cfg: ModelConfig) -> list[str]:
  """Why BLOOM cannot express `cfg` (empty when it can)."""
  checks = [
      (cfg.positions == "alibi", f"positions={cfg.positions!r} (bloom needs 'alibi')"),
      (cfg.embed_norm, "embed_norm=False (bloom always normalizes the embeddings)"),
      (cfg.norm == "layernorm", f"norm={cfg.norm!r} (bloom needs 'layernorm')"),
      (cfg.use_bias, "use_bias=False (bloom always has biases)"),
      (cfg.activation == "gelu", f"activation={cfg.activation!r} (bloom needs 'gelu', "
                                 "the tanh approximation)"),
      (cfg.kv_heads == cfg.num_heads, f"num_kv_heads={cfg.num_kv_heads} (bloom has no GQA)"),
      (cfg.dim_per_head * cfg.num_heads == cfg.d_model,
       f"head_dim={cfg.head_dim} (bloom needs d_model / num_heads)"),
      (cfg.d_ff == 4 * cfg.d_model, f"d_ff={cfg.d_ff} (bloom needs 4 * d_model)"),
      (not cfg.post_norm, "post_norm=True (bloom is pre-norm)"),
      (cfg.scale_attention, "scale_attention=False (bloom scales by 1/sqrt(head_dim))"),
  ]
  return [why for ok, why in checks if not ok]


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


def _block_to_hf(cfg: ModelConfig, i: int, b: Params) -> State:
  p = f"transformer.h.{i}"
  d, f = cfg.d_model, cfg.d_ff
  a, m = b["attn"], b["mlp"]
  qkv = ("query", "key", "value")
  # (D, N, 3, H) -> (D, 3D): the per-head [q, k, v] interleaving BloomAttention expects.
  qkv_w = np.stack([a[k]["kernel"] for k in qkv], axis=2).reshape(d, 3 * d)
  qkv_b = np.stack([a[k]["bias"] for k in qkv], axis=1).reshape(3 * d)
  return {
      **_norm_to_hf(f"{p}.input_layernorm", b["attn_norm"]),
      f"{p}.self_attention.query_key_value.weight": qkv_w.T,
      f"{p}.self_attention.query_key_value.bias": qkv_b,
      **linear_to_torch(f"{p}.self_attention.dense", a["out"], d, d),
      **_norm_to_hf(f"{p}.post_attention_layernorm", b["mlp_norm"]),
      **linear_to_torch(f"{p}.mlp.dense_h_to_4h", m["wi"], d, f),
      **linear_to_torch(f"{p}.mlp.dense_4h_to_h", m["wo"], f, d),
  }


def state_to_hf(cfg: ModelConfig, params: Params) -> State:
  state = {"transformer.word_embeddings.weight": params["embed"]["embedding"],
           **_norm_to_hf("transformer.word_embeddings_layernorm", params["embed_norm"]),
           **_norm_to_hf("transformer.ln_f", params["final_norm"])}
  for i, block in enumerate(unstack_layers(params, cfg.num_layers)):
    state.update(_block_to_hf(cfg, i, block))
  state["lm_head.weight"] = (params["embed"]["embedding"] if cfg.tie_embeddings
                             else params["lm_head"]["kernel"].T)
  return state
