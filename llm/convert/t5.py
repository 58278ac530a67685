"""T5 (T5ForConditionalGeneration / T5Model) <-> llm EncoderDecoder: pre-norm RMSNorm
blocks without biases, one relative-position bias table per stack (HF keeps it in block 0),
unscaled attention, relu (v1.0) or gated-GELU (v1.1) MLP, d_kv * num_heads may differ from
d_model (our head_dim).

The LM head. transformers 5 always ties T5's lm_head to `shared` on construction and
records v1.0-versus-v1.1 in `config.scale_decoder_outputs` (older versions in
`tie_word_embeddings`):
  scale_decoder_outputs=True  (v1.0)  -> tie_embeddings=True: our tied head multiplies by
                                         d_model**-0.5 first, as HF does; a checkpoint whose
                                         lm_head differs from `shared` is rejected.
  scale_decoder_outputs=False (v1.1)  -> tie_embeddings=False with our own lm_head: the
                                         checkpoint's lm_head.weight (v1.1 checkpoints store
                                         one), or a copy of `shared` if it has none.
to_transformers gives an untied model (its own lm_head Parameter) when tie_embeddings is
False; save_pretrained then writes lm_head.weight, and HF's from_pretrained keeps it untied
when it differs from `shared`.

Limits. T5 has no maximum length (relative positions); we set max_len = MAX_LEN (512,
T5's pre-training length), which nothing in the relative-position model reads, so it
does not survive a round trip through HF. The encoder numbers real tokens from
`encoder_segment_ids` (pass the attention mask): relative distances between real tokens
equal HF's for left or right padding.

Not expressible (ConversionError naming the field): feed_forward_proj other than relu,
gelu, gelu_new, gated-gelu, gated-silu (e.g. gated-relu); encoder and decoder token
embeddings that differ from `shared` (we have one table).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm.config import ModelConfig, validate_model
from llm.convert.common import (Params, State, StateReader, hf_field, linear_from_torch,
                                linear_to_torch, require, stack_layers, unstack_layers)
from llm.layers.mlp import GATED

MODEL_TYPE = "t5"
LLM_FAMILY = "encoder_decoder"
MAX_LEN = 512

# HF feed_forward_proj -> ours. "gated-gelu" is special-cased by T5Config to gelu_new
# (tanh approximation), which is what our geglu uses; plain "gelu" is the exact GELU.
_ACT_FROM_HF = {"relu": "relu", "gelu": "gelu_exact", "gelu_new": "gelu",
                "gelu_pytorch_tanh": "gelu", "gated-gelu": "geglu", "gated-gelu_new": "geglu",
                "gated-gelu_pytorch_tanh": "geglu", "gated-silu": "swiglu"}
_ACT_TO_HF = {"relu": "relu", "gelu_exact": "gelu", "gelu": "gelu_new", "geglu": "gated-gelu",
              "swiglu": "gated-silu"}

# Old checkpoints stored a relative bias for the cross-attention that HF never uses.
_IGNORE = (r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",)

_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _scales_tied_head(hf: Any) -> bool:
  """v1.0's d_model**-0.5 rescale before the (tied) head; transformers < 5 had no
  scale_decoder_outputs and used tie_word_embeddings for it."""
  scale = hf_field(hf, "scale_decoder_outputs")
  return bool(hf_field(hf, "tie_word_embeddings", True) if scale is None else scale)


def config_from_hf(hf: Any, scan_layers: bool) -> ModelConfig:
  ffp = hf_field(hf, "feed_forward_proj")
  require(ffp in _ACT_FROM_HF, f"t5 config.feed_forward_proj={ffp!r} is not supported; "
          f"supported: {', '.join(_ACT_FROM_HF)}")
  n = hf.num_heads
  return validate_model(ModelConfig(
      family="encoder_decoder", vocab_size=hf.vocab_size, d_model=hf.d_model,
      num_layers=hf.num_layers, num_decoder_layers=hf_field(hf, "num_decoder_layers") or
      hf.num_layers, num_heads=n, num_kv_heads=n, head_dim=hf.d_kv, d_ff=hf.d_ff,
      max_len=MAX_LEN, positions="relative",
      relative_buckets=int(hf.relative_attention_num_buckets),
      relative_max_distance=int(hf.relative_attention_max_distance), norm="rmsnorm",
      norm_eps=float(hf.layer_norm_epsilon), activation=_ACT_FROM_HF[ffp], use_bias=False,
      tie_embeddings=_scales_tied_head(hf), scale_attention=False, dropout=0.0,
      scan_layers=scan_layers))


def hf_problems(cfg: ModelConfig) -> list[str]:
  """Why T5 cannot express `cfg` (empty when it can)."""
  checks = [
      (cfg.positions == "relative", f"positions={cfg.positions!r} (t5 needs 'relative')"),
      (cfg.norm == "rmsnorm", f"norm={cfg.norm!r} (t5 needs 'rmsnorm')"),
      (not cfg.post_norm, "post_norm=True (t5 blocks are pre-norm)"),
      (not cfg.embed_norm, "embed_norm=True (t5 has no embedding norm)"),
      (not cfg.use_bias, "use_bias=True (t5 has no biases)"),
      (not cfg.scale_attention, "scale_attention=True (t5 does not scale by 1/sqrt(head_dim))"),
      (cfg.activation in _ACT_TO_HF, f"activation={cfg.activation!r} (t5 supports "
                                     f"{', '.join(_ACT_TO_HF)})"),
      (cfg.kv_heads == cfg.num_heads, f"num_kv_heads={cfg.num_kv_heads} (t5 has no GQA)"),
      (cfg.type_vocab_size == 0, f"type_vocab_size={cfg.type_vocab_size} (t5 has no "
                                 "token-type embeddings)"),
  ]
  return [why for ok, why in checks if not ok]


def model_class():
  from transformers import T5ForConditionalGeneration
  return T5ForConditionalGeneration


def model_class_for(hf_config: Any):
  """The class a torch-only (pytorch_model.bin) checkpoint was saved from."""
  import transformers
  archs = hf_field(hf_config, "architectures") or ["T5ForConditionalGeneration"]
  supported = ("T5ForConditionalGeneration", "T5Model")
  require(archs[0] in supported, f"t5 config.architectures={archs!r} is not supported; "
          f"supported: {', '.join(supported)}")
  return getattr(transformers, archs[0])


def config_to_hf(cfg: ModelConfig):
  from transformers import T5Config
  return T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.dim_per_head, d_ff=cfg.d_ff,
      num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers or cfg.num_layers,
      num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_buckets,
      relative_attention_max_distance=cfg.relative_max_distance, dropout_rate=cfg.dropout,
      layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=_ACT_TO_HF[cfg.activation],
      # transformers 5 turns this into scale_decoder_outputs (and ties the head anyway).
      tie_word_embeddings=cfg.tie_embeddings, pad_token_id=0, decoder_start_token_id=0,
      eos_token_id=1 if cfg.vocab_size > 1 else None)


def hf_model(cfg: ModelConfig, state: State):
  """T5ForConditionalGeneration, with an lm_head of its own when tie_embeddings is False."""
  import torch
  model = model_class()(config_to_hf(cfg))
  if not cfg.tie_embeddings:
    # transformers 5 ties lm_head to `shared` whatever the config says; a v1.1 head is its
    # own weight (from_pretrained unties the same way when a checkpoint's head differs).
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is not None:
      tied.pop("lm_head.weight", None)
  return model


# --- weights ---

def _attention_from_hf(get, p: str, cfg: ModelConfig) -> Params:
  d, n, h = cfg.d_model, cfg.num_heads, cfg.dim_per_head
  lin = lambda name, i, o: linear_from_torch(get, f"{p}.{name}", i, o, bias=False)
  return {"query": lin("q", (d,), (n, h)), "key": lin("k", (d,), (n, h)),
          "value": lin("v", (d,), (n, h)), "out": lin("o", (n, h), (d,))}


def _mlp_from_hf(get, p: str, cfg: ModelConfig) -> Params:
  d, f = cfg.d_model, cfg.d_ff
  lin = lambda name, i, o: linear_from_torch(get, f"{p}.{name}", i, o, bias=False)
  if cfg.activation in GATED:  # HF: act(wi_0 x) * wi_1 x
    return {"wi_gate": lin("wi_0", (d,), (f,)), "wi_up": lin("wi_1", (d,), (f,)),
            "wo": lin("wo", (f,), (d,))}
  return {"wi": lin("wi", (d,), (f,)), "wo": lin("wo", (f,), (d,))}


def _block_from_hf(get, cfg: ModelConfig, stack: str, i: int) -> Params:
  p = f"{stack}.block.{i}.layer"
  block = {"attn_norm": {"scale": get(f"{p}.0.layer_norm.weight")},
           "attn": _attention_from_hf(get, f"{p}.0.SelfAttention", cfg)}
  ff = 1
  if stack == "decoder":
    block["cross_norm"] = {"scale": get(f"{p}.1.layer_norm.weight")}
    block["cross"] = _attention_from_hf(get, f"{p}.1.EncDecAttention", cfg)
    ff = 2
  block["mlp_norm"] = {"scale": get(f"{p}.{ff}.layer_norm.weight")}
  block["mlp"] = _mlp_from_hf(get, f"{p}.{ff}.DenseReluDense", cfg)
  return block


def _stack_from_hf(get, cfg: ModelConfig, stack: str, num_layers: int) -> Params:
  return {"rel_bias": get(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
          **stack_layers([_block_from_hf(get, cfg, stack, i) for i in range(num_layers)],
                         cfg.scan_layers),
          "final_norm": {"scale": get(f"{stack}.final_layer_norm.weight")}}


def _token_embedding(get) -> np.ndarray:
  """`shared`, or whichever tied copy a checkpoint kept; every copy present must agree."""
  present = [name for name in _EMBEDDINGS if get.has(name)]
  require(bool(present), f"t5 checkpoint lacks tensor {_EMBEDDINGS[0]!r}")
  table = get(present[0])
  for name in present[1:]:
    require(np.array_equal(get(name), table), f"t5 checkpoint's {name} differs from "
            f"{present[0]}: llm EncoderDecoder has one token embedding for both stacks")
  return table


def params_from_hf(state: State, cfg: ModelConfig) -> Params:
  get = StateReader(state, MODEL_TYPE, _IGNORE)
  embedding = _token_embedding(get)
  num_decoder_layers = cfg.num_decoder_layers or cfg.num_layers
  params = {"embed": {"embedding": embedding},
            "encoder": _stack_from_hf(get, cfg, "encoder", cfg.num_layers),
            "decoder": _stack_from_hf(get, cfg, "decoder", num_decoder_layers)}
  head = get("lm_head.weight") if get.has("lm_head.weight") else None
  if cfg.tie_embeddings:
    require(head is None or np.array_equal(head, embedding), "t5 checkpoint's lm_head.weight "
            "differs from shared.weight with config.scale_decoder_outputs=True: llm's "
            "d_model**-0.5-rescaled head is the tied embedding (set scale_decoder_outputs="
            "False (tie_word_embeddings=False) for an untied, unscaled head)")
  else:
    params["lm_head"] = {"kernel": (embedding if head is None else head).T}
  get.finish()
  return params


def _attention_to_hf(p: str, a: Params, cfg: ModelConfig) -> State:
  d, nh = cfg.d_model, cfg.num_heads * cfg.dim_per_head
  return {**linear_to_torch(f"{p}.q", a["query"], d, nh),
          **linear_to_torch(f"{p}.k", a["key"], d, nh),
          **linear_to_torch(f"{p}.v", a["value"], d, nh),
          **linear_to_torch(f"{p}.o", a["out"], nh, d)}


def _block_to_hf(cfg: ModelConfig, stack: str, i: int, b: Params) -> State:
  p = f"{stack}.block.{i}.layer"
  d, f = cfg.d_model, cfg.d_ff
  state = {f"{p}.0.layer_norm.weight": b["attn_norm"]["scale"],
           **_attention_to_hf(f"{p}.0.SelfAttention", b["attn"], cfg)}
  ff = 1
  if stack == "decoder":
    state[f"{p}.1.layer_norm.weight"] = b["cross_norm"]["scale"]
    state.update(_attention_to_hf(f"{p}.1.EncDecAttention", b["cross"], cfg))
    ff = 2
  state[f"{p}.{ff}.layer_norm.weight"] = b["mlp_norm"]["scale"]
  m, q = b["mlp"], f"{p}.{ff}.DenseReluDense"
  if cfg.activation in GATED:
    state.update({**linear_to_torch(f"{q}.wi_0", m["wi_gate"], d, f),
                  **linear_to_torch(f"{q}.wi_1", m["wi_up"], d, f)})
  else:
    state.update(linear_to_torch(f"{q}.wi", m["wi"], d, f))
  state.update(linear_to_torch(f"{q}.wo", m["wo"], f, d))
  return state


def state_to_hf(cfg: ModelConfig, params: Params) -> State:
  embedding = params["embed"]["embedding"]
  state = {name: embedding for name in _EMBEDDINGS}
  state["lm_head.weight"] = (embedding if cfg.tie_embeddings
                             else params["lm_head"]["kernel"].T)
  for stack, num_layers in (("encoder", cfg.num_layers),
                            ("decoder", cfg.num_decoder_layers or cfg.num_layers)):
    s = params[stack]
    state[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = s["rel_bias"]
    state[f"{stack}.final_layer_norm.weight"] = s["final_norm"]["scale"]
    for i, block in enumerate(unstack_layers(s, num_layers)):
      state.update(_block_to_hf(cfg, stack, i, block))
  return state
