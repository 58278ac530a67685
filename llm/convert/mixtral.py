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

from llm.config import ModelConfig, MoEConfig, validate_model
from llm.convert import llama
from llm.convert.common import (Params, State, default_rope_theta, hf_field,
                                linear_from_torch, linear_to_torch, require, unstack_layers)

MODEL_TYPE = "mixtral"
SUPPORTS_MOE = True

# HF hidden_act -> our gated activation act(x W_gate) * (x W_up).
_ACT_FROM_HF = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
_ACT_TO_HF = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}

# Old checkpoints stored the RoPE frequencies; we recompute them from rope_theta.
_IGNORE = (r"rotary_emb\.inv_freq$",)


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
  return validate_model(ModelConfig(
      family="decoder", vocab_size=hf.vocab_size, d_model=hf.hidden_size,
      num_layers=hf.num_hidden_layers, num_heads=n,
      num_kv_heads=hf_field(hf, "num_key_value_heads") or n,
      head_dim=hf_field(hf, "head_dim") or hf.hidden_size // n, d_ff=hf.intermediate_size,
      max_len=max_pos, positions="rope", rope_theta=default_rope_theta(hf, MODEL_TYPE),
      norm="rmsnorm", norm_eps=float(hf.rms_norm_eps), activation=_ACT_FROM_HF[act],
      use_bias=False, tie_embeddings=bool(hf_field(hf, "tie_word_embeddings", False)),
      dropout=0.0, scan_layers=scan_layers,
      moe=MoEConfig(num_experts=e, top_k=k, every=1, capacity_factor=e / k,
                    aux_loss_weight=float(hf_field(hf, "router_aux_loss_coef", 0.0)),
                    z_loss_weight=0.0, renormalize=True)))


def _experts_from_hf(get, p: str, cfg: ModelConfig) -> Params:
  """Router and expert kernels of layer prefix `p`, from either layout (module doc)."""
  e, f = cfg.moe.num_experts, cfg.d_ff
  if get.has(f"{p}.mlp.experts.gate_up_proj"):
    gate_up_EFD = get(f"{p}.mlp.experts.gate_up_proj")  # (E, 2F, D)
    require(gate_up_EFD.shape[:2] == (e, 2 * f), f"mixtral {p}.mlp.experts.gate_up_proj has "
            f"shape {gate_up_EFD.shape}, expected ({e}, {2 * f}, {cfg.d_model})")
    gate_EDF = gate_up_EFD[:, :f].transpose(0, 2, 1)
    up_EDF = gate_up_EFD[:, f:].transpose(0, 2, 1)
    out_EFD = get(f"{p}.mlp.experts.down_proj").transpose(0, 2, 1)  # (E, D, F) -> (E, F, D)
    router = get(f"{p}.mlp.gate.weight")
  else:
    moe = f"{p}.block_sparse_moe"
    stacked = lambda w: np.stack([get(f"{moe}.experts.{i}.{w}.weight").T for i in range(e)])
    gate_EDF, up_EDF, out_EFD = stacked("w1"), stacked("w3"), stacked("w2")
    router = get(f"{moe}.gate.weight")
  return {"router": {"kernel": router.T}, "wi_gate": {"kernel": gate_EDF},
          "wi_up": {"kernel": up_EDF}, "wo": {"kernel": out_EFD}}


def _block_from_hf(get, cfg: ModelConfig, i: int) -> Params:
  p = f"model.layers.{i}"
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
  lin = lambda name, i_shape, o_shape: linear_from_torch(get, f"{p}.self_attn.{name}",
                                                          i_shape, o_shape, bias=False)
  return {
      "attn_norm": {"scale": get(f"{p}.input_layernorm.weight")},
      "attn": {"query": lin("q_proj", (d,), (n, h)), "key": lin("k_proj", (d,), (k, h)),
               "value": lin("v_proj", (d,), (k, h)), "out": lin("o_proj", (n, h), (d,))},
      "mlp_norm": {"scale": get(f"{p}.post_attention_layernorm.weight")},
      "moe": _experts_from_hf(get, p, cfg),
  }


def params_from_hf(state: State, cfg: ModelConfig) -> Params:
  return llama.llama_style_params(state, cfg, _block_from_hf, MODEL_TYPE, _IGNORE)


def hf_problems(cfg: ModelConfig) -> list[str]:
  """Why Mixtral cannot express `cfg` (empty when it can)."""
  moe = cfg.moe
  e, k = moe.num_experts, moe.top_k
  checks = [
      (e > 0, "moe.num_experts=0 (mixtral needs a mixture-of-experts MLP)"),
      (moe.every == 1 or e == 0, f"moe.every={moe.every} (mixtral layers are all MoE)"),
      (moe.renormalize, "moe.renormalize=False (mixtral renormalizes the top-k gates)"),
      # capacity_factor * k / E >= 1 <=> capacity = the whole group: nothing is dropped.
      (e == 0 or moe.capacity_factor * k >= e * (1 - 1e-9),
       f"moe.capacity_factor={moe.capacity_factor} < num_experts / top_k = "
       f"{e / max(k, 1):g} (mixtral never drops tokens; set capacity_factor to "
       f"{e / max(k, 1):g} or more to export)"),
      (cfg.positions == "rope", f"positions={cfg.positions!r} (mixtral needs 'rope')"),
      (cfg.norm == "rmsnorm", f"norm={cfg.norm!r} (mixtral needs 'rmsnorm')"),
      (cfg.activation in _ACT_TO_HF, f"activation={cfg.activation!r} (mixtral supports "
                                     f"{', '.join(_ACT_TO_HF)})"),
      (not cfg.use_bias, "use_bias=True (mixtral has no biases)"),
      (not cfg.embed_norm, "embed_norm=True (mixtral has no embedding norm)"),
      (not cfg.post_norm, "post_norm=True (mixtral is pre-norm)"),
      (cfg.scale_attention, "scale_attention=False (mixtral scales by 1/sqrt(head_dim))"),
  ]
  return [why for ok, why in checks if not ok]


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


def _block_to_hf(cfg: ModelConfig, i: int, b: Params) -> State:
  p = f"model.layers.{i}"
  d = cfg.d_model
  nh, kh = cfg.num_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
  a, m = b["attn"], b["moe"]
  state = {f"{p}.input_layernorm.weight": b["attn_norm"]["scale"],
           f"{p}.post_attention_layernorm.weight": b["mlp_norm"]["scale"],
           **linear_to_torch(f"{p}.self_attn.q_proj", a["query"], d, nh),
           **linear_to_torch(f"{p}.self_attn.k_proj", a["key"], d, kh),
           **linear_to_torch(f"{p}.self_attn.v_proj", a["value"], d, kh),
           **linear_to_torch(f"{p}.self_attn.o_proj", a["out"], nh, d)}
  to_EOI = lambda x: np.asarray(x).transpose(0, 2, 1)  # (E, in, out) -> torch (E, out, in)
  state[f"{p}.mlp.gate.weight"] = m["router"]["kernel"].T
  state[f"{p}.mlp.experts.gate_up_proj"] = np.concatenate(
      [to_EOI(m["wi_gate"]["kernel"]), to_EOI(m["wi_up"]["kernel"])], axis=1)
  state[f"{p}.mlp.experts.down_proj"] = to_EOI(m["wo"]["kernel"])
  return state


def state_to_hf(cfg: ModelConfig, params: Params) -> State:
  state = {"model.embed_tokens.weight": params["embed"]["embedding"],
           "model.norm.weight": params["final_norm"]["scale"]}
  for i, block in enumerate(unstack_layers(params, cfg.num_layers)):
    state.update(_block_to_hf(cfg, i, block))
  state["lm_head.weight"] = (params["embed"]["embedding"] if cfg.tie_embeddings
                             else params["lm_head"]["kernel"].T)
  return state
