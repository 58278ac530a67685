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

from llm.config import ModelConfig
from llm.convert import table as t
from llm.convert.common import Params, State, hf_field, reject_if, require

MODEL_TYPE = "bart"
LLM_FAMILY = "encoder_decoder"
POSITION_OFFSET = 2  # BartLearnedPositionalEmbedding.offset
NORM_EPS = 1e-5  # BART's nn.LayerNorms use torch's default eps

_ACT_FROM_HF = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                "relu": "relu"}
_ACT_TO_HF = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}

FIELDS = t.Fields(
    fixed={"family": "encoder_decoder", "positions": "learned",
           "position_offset": POSITION_OFFSET, "norm": "layernorm", "norm_eps": NORM_EPS,
           "post_norm": True, "embed_norm": True, "use_bias": True, "scale_attention": True},
    allowed={"activation": tuple(_ACT_TO_HF)},
    rules=(t.DENSE, t.NO_GQA, t.HEAD_DIM),
    carried=("vocab_size", "d_model", "num_layers", "num_decoder_layers", "num_heads", "d_ff",
             "max_len", "tie_embeddings"),
    # The EncoderDecoder has no token-type embeddings.
    unused=("rope_theta", "type_vocab_size", "relative_buckets", "relative_max_distance",
            *t.MOE_KNOBS))

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
  return t.build_config(
      MODEL_TYPE, FIELDS, vocab_size=hf.vocab_size, d_model=d,
      num_layers=hf.encoder_layers, num_decoder_layers=hf.decoder_layers, num_heads=n,
      num_kv_heads=n, head_dim=d // n, d_ff=f, max_len=hf.max_position_embeddings,
      activation=_ACT_FROM_HF[act],
      tie_embeddings=bool(hf_field(hf, "tie_word_embeddings", True)), dropout=0.0,
      scan_layers=scan_layers)


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


def _attention(d: int, n: int, h: int) -> list[t.Entry]:
  return [*t.linear("query", "q_proj", (d,), (n, h), bias=True),
          *t.linear("key", "k_proj", (d,), (n, h), bias=True),
          *t.linear("value", "v_proj", (d,), (n, h), bias=True),
          *t.linear("out", "out_proj", (n, h), (d,), bias=True)]


def _stack(cfg: ModelConfig, stack: str, num_layers: int) -> list[t.Entry]:
  d, n, h, f = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff
  attn = _attention(d, n, h)
  block = [*t.under("attn", "self_attn", attn), *t.norm("attn_norm", "self_attn_layer_norm")]
  if stack == "decoder":
    block += [*t.under("cross", "encoder_attn", attn),
              *t.norm("cross_norm", "encoder_attn_layer_norm")]
  block += [*t.linear("mlp/wi", "fc1", (d,), (f,), bias=True),
            *t.linear("mlp/wo", "fc2", (f,), (d,), bias=True),
            *t.norm("mlp_norm", "final_layer_norm")]
  return t.under(stack, f"model.{stack}", [
      *t.same("pos_embed/embedding", "embed_positions.weight"),
      *t.norm("embed_norm", "layernorm_embedding"),
      *t.per_layer(num_layers, "layers.{i}", block)])


def _zero_logits_bias(bias: np.ndarray) -> tuple:
  require(not np.any(bias), "bart checkpoint's final_logits_bias is non-zero: llm "
          "EncoderDecoder has no bias on the logits")
  return ()


def tensors(cfg: ModelConfig, logits_bias: bool = True) -> list[t.Entry]:
  """`logits_bias`: the checkpoint has final_logits_bias (BartModel has none)."""
  one_table = "llm EncoderDecoder has one token embedding for both stacks"
  if cfg.tie_embeddings:
    embed = [t.Tied("embed/embedding", (*_EMBEDDINGS, "lm_head.weight"),
                    one_table + " and the tied LM head")]
  else:
    embed = [t.Tied("embed/embedding", _EMBEDDINGS, one_table),
             *t.transposed("lm_head/kernel", "lm_head.weight")]
  bias = [t.Tensor((), ("final_logits_bias",), _zero_logits_bias,
                   lambda: (np.zeros((1, cfg.vocab_size), np.float32),))] if logits_bias else []
  return [*embed, *bias, *_stack(cfg, "encoder", cfg.num_layers),
          *_stack(cfg, "decoder", cfg.num_decoder_layers or cfg.num_layers)]


def params_from_hf(state: State, cfg: ModelConfig) -> Params:
  state = _with_model_prefix(state)
  return t.params_from_hf(tensors(cfg, "final_logits_bias" in state), state, MODEL_TYPE,
                          cfg.scan_layers)


def state_to_hf(cfg: ModelConfig, params: Params) -> State:
  return t.params_to_hf(tensors(cfg), params, MODEL_TYPE)
