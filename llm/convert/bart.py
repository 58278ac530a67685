"""BART (BartForConditionalGeneration / BartModel) <-> llm EncoderDecoder: post-norm
LayerNorm blocks with biases, learned positions from row 2 of each stack's table (our
position_offset=2), a LayerNorm on the embeddings of each stack (embed_norm), no final
norm, queries scaled by head_dim**-0.5, one token embedding shared by both stacks and
(usually) the LM head.

Padding. HF BART numbers positions 0..S-1 whatever the padding, and the pad id is 1 (id 0
is <s>). Pass `encoder_segment_ids = attention_mask` (the EncoderDecoder's default,
tokens != 0, is wrong for BART), and pad on the right: the encoder numbers real tokens
from the segment ids and takes no explicit positions, so left-padded input gets other
positions than HF gives it.

Not expressible (ConversionError naming the field): scale_embedding=True (our embeddings
are not multiplied by sqrt(d_model)); a non-zero final_logits_bias (we have no logits
bias; it is a zero buffer in BART checkpoints); encoder and decoder that differ in
attention heads or FFN width; encoder / decoder token embeddings that differ from
`shared` (one table in our model); activations other than gelu, gelu_new, relu.
mBART-style variants (a final layer norm, pre-norm) are other model types.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm.config import ModelConfig, validate_model
from llm.convert.common import (Params, State, StateReader, hf_field, linear_from_torch,
                                linear_to_torch, reject_if, require, stack_layers,
                                unstack_layers)

MODEL_TYPE = "bart"
LLM_FAMILY = "encoder_decoder"
POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding.offset
NORM_EPS = 1e-5  # BART's nn.LayerNorms use torch's default eps

_ACT_FROM_HF = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                "relu": "relu"}
_ACT_TO_HF = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}

_EMBEDDINGS = ("model.shared.weight", "model.encoder.embed_tokens.weight",
               "model.decoder.embed_tokens.weight")
_TOP_LEVEL = ("lm_head.", "final_logits_bias")  # not under BartForConditionalGeneration.model


def _equal_sizes(hf: Any, encoder_field: str, decoder_field: str) -> int:
  enc, dec = hf_field(hf, encoder_field), hf_field(hf, decoder_field)
  require(enc == dec, f"bart config.{decoder_field}={dec} differs from config.{encoder_field}="
          f"{enc}: llm EncoderDecoder uses one num_heads / d_ff for both stacks")
  return int(enc)


def config_from_hf(hf: Any, scan_layers: bool) -> ModelConfig:
  act = hf_field(hf, "activation_function")
  require(act in _ACT_FROM_HF, f"bart config.activation_function={act!r} is not supported; "
          f"supported: {', '.join(_ACT_FROM_HF)}")
  reject_if(hf, MODEL_TYPE, "scale_embedding", bool,
            "llm EncoderDecoder does not multiply embeddings by sqrt(d_model)")
  n = _equal_sizes(hf, "encoder_attention_heads", "decoder_attention_heads")
  f = _equal_sizes(hf, "encoder_ffn_dim", "decoder_ffn_dim")
  d = hf.d_model
  require(d % n == 0, f"bart config.d_model={d} is not divisible by "
          f"config.encoder_attention_heads={n}")
  return validate_model(ModelConfig(
      family="encoder_decoder", vocab_size=hf.vocab_size, d_model=d,
      num_layers=hf.encoder_layers, num_decoder_layers=hf.decoder_layers, num_heads=n,
      num_kv_heads=n, head_dim=d // n, d_ff=f, max_len=hf.max_position_embeddings,
      positions="learned", position_offset=POSITION_OFFSET, norm="layernorm",
      norm_eps=NORM_EPS, activation=_ACT_FROM_HF[act], use_bias=True,
      tie_embeddings=bool(hf_field(hf, "tie_word_embeddings", True)), post_norm=True,
      embed_norm=True, scale_attention=True, dropout=0.0, scan_layers=scan_layers))


def hf_problems(cfg: ModelConfig) -> list[str]:
  """Why BART cannot express `cfg` (empty when it can)."""
  checks = [
      (cfg.positions == "learned", f"positions={cfg.positions!r} (bart needs 'learned')"),
      (cfg.position_offset == POSITION_OFFSET, f"position_offset={cfg.position_offset} (bart "
                                               f"positions start at row {POSITION_OFFSET})"),
      (cfg.norm == "layernorm", f"norm={cfg.norm!r} (bart needs 'layernorm')"),
      (cfg.norm_eps == NORM_EPS, f"norm_eps={cfg.norm_eps} (bart's LayerNorm eps is "
                                 f"{NORM_EPS})"),
      (cfg.post_norm, "post_norm=False (bart blocks are post-norm)"),
      (cfg.embed_norm, "embed_norm=False (bart normalizes the embeddings)"),
      (cfg.use_bias, "use_bias=False (bart always has biases)"),
      (cfg.scale_attention, "scale_attention=False (bart scales by 1/sqrt(head_dim))"),
      (cfg.activation in _ACT_TO_HF, f"activation={cfg.activation!r} (bart supports "
                                     f"{', '.join(_ACT_TO_HF)})"),
      (cfg.kv_heads == cfg.num_heads, f"num_kv_heads={cfg.num_kv_heads} (bart has no GQA)"),
      (cfg.dim_per_head * cfg.num_heads == cfg.d_model,
       f"head_dim={cfg.head_dim} (bart needs d_model / num_heads)"),
      (cfg.type_vocab_size == 0, f"type_vocab_size={cfg.type_vocab_size} (bart has no "
                                 "token-type embeddings)"),
  ]
  return [why for ok, why in checks if not ok]


def model_class():
  from transformers import BartForConditionalGeneration
  return BartForConditionalGeneration


def model_class_for(hf_config: Any):
  """The class a torch-only (pytorch_model.bin) checkpoint was saved from."""
  import transformers
  archs = hf_field(hf_config, "architectures") or ["BartForConditionalGeneration"]
  supported = ("BartForConditionalGeneration", "BartModel")
  require(archs[0] in supported, f"bart config.architectures={archs!r} is not supported; "
          f"supported: {', '.join(supported)}")
  return getattr(transformers, archs[0])


def config_to_hf(cfg: ModelConfig):
  from transformers import BartConfig
  # BartConfig's default special ids are tokenizer business; keep them where they fit.
  special = {name: (default if default < cfg.vocab_size else None) for name, default in
             (("pad_token_id", 1), ("bos_token_id", 0), ("eos_token_id", 2),
              ("decoder_start_token_id", 2), ("forced_eos_token_id", 2))}
  return BartConfig(
      vocab_size=cfg.vocab_size, d_model=cfg.d_model, encoder_layers=cfg.num_layers,
      decoder_layers=cfg.num_decoder_layers or cfg.num_layers,
      encoder_attention_heads=cfg.num_heads, decoder_attention_heads=cfg.num_heads,
      encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, max_position_embeddings=cfg.max_len,
      activation_function=_ACT_TO_HF[cfg.activation], dropout=cfg.dropout,
      attention_dropout=cfg.dropout, activation_dropout=cfg.dropout, scale_embedding=False,
      tie_word_embeddings=cfg.tie_embeddings, **special)


# --- weights ---

def _with_model_prefix(state: State) -> State:
  """BartModel checkpoints (e.g. the hub's bart-base) omit `model.`."""
  if any(k.startswith("model.") for k in state):
    return state
  return {(k if k.startswith(_TOP_LEVEL) else "model." + k): v for k, v in state.items()}


def _attention_from_hf(get, p: str, cfg: ModelConfig) -> Params:
  d, n, h = cfg.d_model, cfg.num_heads, cfg.dim_per_head
  lin = lambda name, i, o: linear_from_torch(get, f"{p}.{name}", i, o, bias=True)
  return {"query": lin("q_proj", (d,), (n, h)), "key": lin("k_proj", (d,), (n, h)),
          "value": lin("v_proj", (d,), (n, h)), "out": lin("out_proj", (n, h), (d,))}


def _norm_from_hf(get, name: str) -> Params:
  return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}


def _block_from_hf(get, cfg: ModelConfig, stack: str, i: int) -> Params:
  p = f"model.{stack}.layers.{i}"
  d, f = cfg.d_model, cfg.d_ff
  block = {"attn": _attention_from_hf(get, f"{p}.self_attn", cfg),
           "attn_norm": _norm_from_hf(get, f"{p}.self_attn_layer_norm")}
  if stack == "decoder":
    block["cross"] = _attention_from_hf(get, f"{p}.encoder_attn", cfg)
    block["cross_norm"] = _norm_from_hf(get, f"{p}.encoder_attn_layer_norm")
  block["mlp"] = {"wi": linear_from_torch(get, f"{p}.fc1", (d,), (f,), bias=True),
                  "wo": linear_from_torch(get, f"{p}.fc2", (f,), (d,), bias=True)}
  block["mlp_norm"] = _norm_from_hf(get, f"{p}.final_layer_norm")
  return block


def _stack_from_hf(get, cfg: ModelConfig, stack: str, num_layers: int) -> Params:
  p = f"model.{stack}"
  return {"pos_embed": {"embedding": get(f"{p}.embed_positions.weight")},
          "embed_norm": _norm_from_hf(get, f"{p}.layernorm_embedding"),
          **stack_layers([_block_from_hf(get, cfg, stack, i) for i in range(num_layers)],
                         cfg.scan_layers)}


def _token_embedding(get, tied_head: bool) -> np.ndarray:
  """`shared`, or whichever tied copy a checkpoint kept; every copy present must agree."""
  names = _EMBEDDINGS + (("lm_head.weight",) if tied_head else ())
  present = [name for name in names if get.has(name)]
  require(bool(present), f"bart checkpoint lacks tensor {_EMBEDDINGS[0]!r}")
  table = get(present[0])
  for name in present[1:]:
    require(np.array_equal(get(name), table), f"bart checkpoint's {name} differs from "
            f"{present[0]}: llm EncoderDecoder has one token embedding for both stacks"
            f"{' and the tied LM head' if tied_head else ''}")
  return table


def params_from_hf(state: State, cfg: ModelConfig) -> Params:
  get = StateReader(_with_model_prefix(state), MODEL_TYPE)
  if get.has("final_logits_bias"):
    require(not np.any(get("final_logits_bias")), "bart checkpoint's final_logits_bias is "
            "non-zero: llm EncoderDecoder has no bias on the logits")
  params = {"embed": {"embedding": _token_embedding(get, cfg.tie_embeddings)},
            "encoder": _stack_from_hf(get, cfg, "encoder", cfg.num_layers),
            "decoder": _stack_from_hf(get, cfg, "decoder",
                                      cfg.num_decoder_layers or cfg.num_layers)}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": get("lm_head.weight").T}
  get.finish()
  return params


def _attention_to_hf(p: str, a: Params, d: int) -> State:
  return {**linear_to_torch(f"{p}.q_proj", a["query"], d, d),
          **linear_to_torch(f"{p}.k_proj", a["key"], d, d),
          **linear_to_torch(f"{p}.v_proj", a["value"], d, d),
          **linear_to_torch(f"{p}.out_proj", a["out"], d, d)}


def _norm_to_hf(name: str, p: Params) -> State:
  return {f"{name}.weight": p["scale"], f"{name}.bias": p["bias"]}


def _block_to_hf(cfg: ModelConfig, stack: str, i: int, b: Params) -> State:
  p = f"model.{stack}.layers.{i}"
  d, f = cfg.d_model, cfg.d_ff
  state = {**_attention_to_hf(f"{p}.self_attn", b["attn"], d),
           **_norm_to_hf(f"{p}.self_attn_layer_norm", b["attn_norm"])}
  if stack == "decoder":
    state.update({**_attention_to_hf(f"{p}.encoder_attn", b["cross"], d),
                  **_norm_to_hf(f"{p}.encoder_attn_layer_norm", b["cross_norm"])})
  state.update({**linear_to_torch(f"{p}.fc1", b["mlp"]["wi"], d, f),
                **linear_to_torch(f"{p}.fc2", b["mlp"]["wo"], f, d),
                **_norm_to_hf(f"{p}.final_layer_norm", b["mlp_norm"])})
  return state


def state_to_hf(cfg: ModelConfig, params: Params) -> State:
  embedding = params["embed"]["embedding"]
  state = {name: embedding for name in _EMBEDDINGS}
  state["lm_head.weight"] = (embedding if cfg.tie_embeddings
                             else params["lm_head"]["kernel"].T)
  state["final_logits_bias"] = np.zeros((1, cfg.vocab_size), np.float32)
  for stack, num_layers in (("encoder", cfg.num_layers),
                            ("decoder", cfg.num_decoder_layers or cfg.num_layers)):
    s, p = params[stack], f"model.{stack}"
    state[f"{p}.embed_positions.weight"] = s["pos_embed"]["embedding"]
    state.update(_norm_to_hf(f"{p}.layernorm_embedding", s["embed_norm"]))
    for i, block in enumerate(unstack_layers(s, num_layers)):
      state.update(_block_to_hf(cfg, stack, i, block))
  return state
