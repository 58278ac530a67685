"""Mixtral (MixtralForCausalLM) <-> llm decoder whose every layer is a top-k MoE: LLaMA's
attention (RoPE, RMSNorm, GQA, no biases, untied head) with a router and E gated experts.

Expert weights come in two layouts, both read here:
  transformers >= 5 in memory: `mlp.gate.weight` (E, D), `mlp.experts.gate_up_proj`
    (E, 2F, D) = [w1 (gate); w3 (up)] along F, `mlp.experts.down_proj` (E, D, F);
  checkpoints on disk (also what transformers 5 writes) and transformers 4 in memory:
    `block_sparse_moe.gate.weight` and `block_sparse_moe.experts.{e}.w1/w3/w2.weight`
    ((F, D), (F, D), (D, F)).
to_transformers builds the in-memory (fused) layout; HF's save_pretrained writes the
per-expert one.

Routing. HF: softmax over the E router logits in float32, top-k, the k weights
renormalized to sum to 1, every chosen expert run for every token (nothing dropped). Ours:
the same with renormalize=True, and capacity_factor = E / k, which makes the capacity the
whole routing group (expert_capacity clips it to G), so no token is ever dropped either.
The other way, a config whose capacity_factor < E / k (one that can drop tokens) is
rejected: raise it to num_experts / top_k to export (HF then runs what we would with
an unlimited capacity).

Aux losses (training only, no effect on logits): aux_loss_weight <- router_aux_loss_coef,
z_loss_weight = 0 (Mixtral has none). The loss forms differ: HF pools expert counts and
router probabilities over all layers before one product and counts each of the k choices
(its fractions sum to k), ours sums per-layer Switch losses with fractions summing to 1.
router_jitter_noise is training-only and ignored; z_loss_weight is dropped on export.

sliding_window: HF masks keys more than `sliding_window` positions back; our attention
has no window, so a window shorter than max_position_embeddings raises (a window that
long never binds within the context).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm.config import ModelConfig, MoEConfig
from llm.convert import llama
from llm.convert import table as t
from llm.convert.common import (Params, State, add_prefix, default_rope_theta, hf_field,
                                require)

MODEL_TYPE = "mixtral"

# HF hidden_act -> our gated activation act(x W_gate) * (x W_up).
_ACT_FROM_HF = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
_ACT_TO_HF = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}


def _never_drops(cfg: ModelConfig) -> bool:
  # capacity_factor * k / E >= 1 <=> capacity = the whole group: nothing is dropped.
  e, k = cfg.moe.num_experts, cfg.moe.top_k
  return cfg.moe.capacity_factor * k >= e * (1 - 1e-9)


FIELDS = t.Fields(
    fixed={"family": "decoder", "positions": "rope", "norm": "rmsnorm", "use_bias": False,
           "post_norm": False, "embed_norm": False, "scale_attention": True,
           "moe.every": 1, "moe.renormalize": True},
    allowed={"activation": tuple(_ACT_TO_HF)},
    rules=(t.Rule("moe.num_experts", lambda c: c.moe.num_experts > 0,
                  ">= 1 (mixtral layers are all mixture-of-experts)"),
           t.Rule("moe.capacity_factor", _never_drops,
                  lambda c: f"num_experts / top_k = {c.moe.num_experts / c.moe.top_k:g} or "
                  "more: mixtral never drops tokens")),
    carried=("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "d_ff", "max_len", "rope_theta", "norm_eps", "tie_embeddings",
             "moe.num_experts", "moe.top_k", "moe.aux_loss_weight"),
    # Mixtral has no router z-loss; like the aux loss it never changes the logits.
    unused=("num_decoder_layers", "type_vocab_size", "position_offset", "relative_buckets",
            "relative_max_distance", "moe.z_loss_weight"))


def config_from_hf(hf: Any, scan_layers: bool) -> ModelConfig:
  act = hf_field(hf, "hidden_act")
  require(act in _ACT_FROM_HF, f"mixtral config.hidden_act={act!r} is not supported; "
          f"supported: {', '.join(_ACT_FROM_HF)}")
  window, max_pos = hf_field(hf, "sliding_window"), hf.max_position_embeddings
  require(window is None or window >= max_pos,
          f"mixtral config.sliding_window={window!r} is not supported: llm attention has no "
          f"sliding window (only None or >= max_position_embeddings={max_pos}, where it "
          "never binds)")
  n, e, k = hf.num_attention_heads, hf.num_local_experts, hf.num_experts_per_tok
  return t.build_config(
      MODEL_TYPE, FIELDS, vocab_size=hf.vocab_size, d_model=hf.hidden_size,
      num_layers=hf.num_hidden_layers, num_heads=n,
      num_kv_heads=hf_field(hf, "num_key_value_heads") or n,
      head_dim=hf_field(hf, "head_dim") or hf.hidden_size // n, d_ff=hf.intermediate_size,
      max_len=max_pos, rope_theta=default_rope_theta(hf, MODEL_TYPE),
      norm_eps=float(hf.rms_norm_eps), activation=_ACT_FROM_HF[act],
      tie_embeddings=bool(hf_field(hf, "tie_word_embeddings", False)), dropout=0.0,
      scan_layers=scan_layers,
      moe=MoEConfig(num_experts=e, top_k=k, capacity_factor=e / k,
                    aux_loss_weight=float(hf_field(hf, "router_aux_loss_coef", 0.0)),
                    z_loss_weight=0.0))


def _to_EOI(x: np.ndarray) -> np.ndarray:
  return x.transpose(0, 2, 1)  # (E, in, out) <-> torch's (E, out, in)


def tensors(cfg: ModelConfig) -> list[t.Entry]:
  e, f, d = cfg.moe.num_experts, cfg.d_ff, cfg.d_model

  def gate_up_from_hf(gate_up_EFD):  # (E, 2F, D) = [w1 (gate); w3 (up)] along F
    require(gate_up_EFD.shape == (e, 2 * f, d), f"mixtral mlp.experts.gate_up_proj has shape "
            f"{gate_up_EFD.shape}, expected ({e}, {2 * f}, {d})")
    return _to_EOI(gate_up_EFD[:, :f]), _to_EOI(gate_up_EFD[:, f:])

  block = [*llama.attention(cfg),
           *t.transposed("moe/router/kernel", "mlp.gate.weight"),
           t.Tensor(("moe/wi_gate/kernel", "moe/wi_up/kernel"), ("mlp.experts.gate_up_proj",),
                    gate_up_from_hf,
                    lambda gate, up: (np.concatenate([_to_EOI(gate), _to_EOI(up)], axis=1),)),
           t.Tensor(("moe/wo/kernel",), ("mlp.experts.down_proj",),  # (E, D, F) <-> (E, F, D)
                    lambda w: (_to_EOI(w),), lambda k: (_to_EOI(k),))]
  return [*llama.outside_blocks(cfg), *t.per_layer(cfg.num_layers, "model.layers.{i}", block)]


def _fuse_per_expert_layout(state: State, cfg: ModelConfig) -> State:
  """The on-disk names (`block_sparse_moe.experts.{e}.w1/w3/w2`) as the fused in-memory
  layout `tensors` maps; layers already fused are left alone."""
  state = dict(state)

  def take(name):
    require(name in state, f"mixtral checkpoint lacks tensor {name!r}")
    return state.pop(name)

  for i in range(cfg.num_layers):
    moe, mlp = f"model.layers.{i}.block_sparse_moe", f"model.layers.{i}.mlp"
    if f"{moe}.gate.weight" not in state:
      continue
    state[f"{mlp}.gate.weight"] = take(f"{moe}.gate.weight")
    experts = range(cfg.moe.num_experts)
    state[f"{mlp}.experts.gate_up_proj"] = np.stack(  # w1, w3 (F, D) each
        [np.concatenate([take(f"{moe}.experts.{x}.w1.weight"),
                         take(f"{moe}.experts.{x}.w3.weight")]) for x in experts])
    state[f"{mlp}.experts.down_proj"] = np.stack(  # w2 (D, F)
        [take(f"{moe}.experts.{x}.w2.weight") for x in experts])
  return state


def params_from_hf(state: State, cfg: ModelConfig) -> Params:
  state = _fuse_per_expert_layout(add_prefix(state, "model.", marker="model."), cfg)
  return t.params_from_hf(tensors(cfg), state, MODEL_TYPE, cfg.scan_layers, llama.IGNORE)


def state_to_hf(cfg: ModelConfig, params: Params) -> State:
  return t.params_to_hf(tensors(cfg), params, MODEL_TYPE)


def model_class():
  from transformers import MixtralForCausalLM
  return MixtralForCausalLM


def config_to_hf(cfg: ModelConfig):
  from transformers import MixtralConfig
  moe = cfg.moe
  return MixtralConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
      hidden_act=_ACT_TO_HF[cfg.activation], max_position_embeddings=cfg.max_len,
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      sliding_window=None, attention_dropout=cfg.dropout, num_local_experts=moe.num_experts,
      num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.aux_loss_weight)
