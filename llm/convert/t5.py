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

from llm.config import ModelConfig
from llm.convert import table as t
from llm.convert.common import Params, State, hf_field, require
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

FIELDS = t.Fields(
    fixed={"family": "encoder_decoder", "positions": "relative", "norm": "rmsnorm",
           "post_norm": False, "embed_norm": False, "use_bias": False,
           "scale_attention": False},
    allowed={"activation": tuple(_ACT_TO_HF)},
    rules=(t.DENSE, t.NO_GQA),
    carried=("vocab_size", "d_model", "num_layers", "num_decoder_layers", "num_heads",
             "head_dim", "d_ff", "relative_buckets", "relative_max_distance", "norm_eps",
             "tie_embeddings"),
    # Relative positions: no table for max_len to size (it does not survive a round trip);
    # the EncoderDecoder has no token-type embeddings.
    unused=("max_len", "rope_theta", "position_offset", "type_vocab_size", *t.MOE_KNOBS))

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
  return t.build_config(
      MODEL_TYPE, FIELDS, vocab_size=hf.vocab_size, d_model=hf.d_model,
      num_layers=hf.num_layers, num_decoder_layers=hf_field(hf, "num_decoder_layers") or
      hf.num_layers, num_heads=n, num_kv_heads=n, head_dim=hf.d_kv, d_ff=hf.d_ff,
      max_len=MAX_LEN, relative_buckets=int(hf.relative_attention_num_buckets),
      relative_max_distance=int(hf.relative_attention_max_distance),
      norm_eps=float(hf.layer_norm_epsilon), activation=_ACT_FROM_HF[ffp],
      tie_embeddings=_scales_tied_head(hf), dropout=0.0, scan_layers=scan_layers)


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

def _attention(cfg: ModelConfig) -> list[t.Entry]:
  d, n, h = cfg.d_model, cfg.num_heads, cfg.dim_per_head
  return [*t.linear("query", "q", (d,), (n, h), bias=False),
          *t.linear("key", "k", (d,), (n, h), bias=False),
          *t.linear("value", "v", (d,), (n, h), bias=False),
          *t.linear("out", "o", (n, h), (d,), bias=False)]


def _mlp(cfg: ModelConfig) -> list[t.Entry]:
  d, f = cfg.d_model, cfg.d_ff
  if cfg.activation in GATED:  # HF: act(wi_0 x) * wi_1 x
    wi = [*t.linear("wi_gate", "wi_0", (d,), (f,), bias=False),
          *t.linear("wi_up", "wi_1", (d,), (f,), bias=False)]
  else:
    wi = t.linear("wi", "wi", (d,), (f,), bias=False)
  return [*wi, *t.linear("wo", "wo", (f,), (d,), bias=False)]


def _stack(cfg: ModelConfig, stack: str, num_layers: int) -> list[t.Entry]:
  """One stack: HF keeps its relative-position table in block 0's self-attention."""
  attn = [*t.norm("attn_norm", "0.layer_norm", bias=False),
          *t.under("attn", "0.SelfAttention", _attention(cfg))]
  cross = [*t.norm("cross_norm", "1.layer_norm", bias=False),
           *t.under("cross", "1.EncDecAttention", _attention(cfg))] if stack == "decoder" else []
  ff = 2 if cross else 1
  block = [*attn, *cross, *t.norm("mlp_norm", f"{ff}.layer_norm", bias=False),
           *t.under("mlp", f"{ff}.DenseReluDense", _mlp(cfg))]
  return t.under(stack, stack, [
      *t.same("rel_bias", "block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
      *t.per_layer(num_layers, "block.{i}.layer", block),
      *t.norm("final_norm", "final_layer_norm", bias=False)])


def tensors(cfg: ModelConfig) -> list[t.Entry]:
  one_table = "llm EncoderDecoder has one token embedding for both stacks"
  if cfg.tie_embeddings:  # v1.0: the rescaled head is the embedding
    embed = [t.Tied("embed/embedding", (*_EMBEDDINGS, "lm_head.weight"), one_table +
                    " and, with config.scale_decoder_outputs=True, for its d_model**-0.5-"
                    "rescaled LM head (scale_decoder_outputs=False (tie_word_embeddings="
                    "False) gives an untied, unscaled head)")]
  else:
    embed = [t.Tied("embed/embedding", _EMBEDDINGS, one_table),
             *t.transposed("lm_head/kernel", "lm_head.weight")]
  return [*embed, *_stack(cfg, "encoder", cfg.num_layers),
          *_stack(cfg, "decoder", cfg.num_decoder_layers or cfg.num_layers)]


def params_from_hf(state: State, cfg: ModelConfig) -> Params:
  present = [name for name in _EMBEDDINGS if name in state]
  if not cfg.tie_embeddings and "lm_head.weight" not in state and present:
    state = {**state, "lm_head.weight": state[present[0]]}  # a v1.1 head saved tied
  return t.params_from_hf(tensors(cfg), state, MODEL_TYPE, cfg.scan_layers, _IGNORE)


def state_to_hf(cfg: ModelConfig, params: Params) -> State:
  return t.params_to_hf(tensors(cfg), params, MODEL_TYPE)
