"""BERT (BertForMaskedLM / BertModel) and RoBERTa (RobertaForMaskedLM / RobertaModel) <->
llm Encoder: post-norm blocks, LayerNorm on the summed embeddings, learned positions,
token-type embeddings, tied MLM head.

The two differ only in names and positions: RoBERTa's learned positions start at row
padding_idx + 1 of the table (our `position_offset`), so `max_len` is two rows shorter
than `max_position_embeddings` for the usual padding_idx 1.

Heads. Our params hold exactly the heads the checkpoint has, nothing invented:
  *ForMaskedLM -> MLM head (mlm_dense, mlm_norm, mlm_bias), no pooler (HF has none there);
  *Model       -> pooler if the checkpoint has one, no MLM head.
Applying the Encoder with an output whose head is missing fails with flax's missing-param
error; for fine-tuning, start from an `init` tree and overlay the converted params
(`llm.convert.common.fill_missing`). The other direction picks the HF class from the
params: an MLM head gives *ForMaskedLM (which has no pooler, so ours is left out; it is
untrained by MLM anyway), otherwise *Model, with a pooler iff the params have one.
A `classifier` head raises: *ForSequenceClassification is not mapped yet.

Positions. HF BERT numbers positions 0..T-1 whatever the padding; HF RoBERTa counts
non-padding tokens (token id == pad_token_id is padding). The Encoder numbers real tokens
from `segment_ids` (0 = padding), so with padding pass `segment_ids = attention_mask`:
that matches RoBERTa for any padding side and BERT for right padding (pass explicit
`positions` for left-padded BERT input).

Not expressible (ConversionError): an MLM decoder that differs from the token embedding
(the Encoder's MLM head is always tied), and a RoBERTa MLM head with hidden_act other than
"gelu" (RobertaLMHead hard-codes exact GELU; ours follows config.model.activation).
"""

from __future__ import annotations

from typing import Any

from llm.config import ModelConfig
from llm.convert import table as t
from llm.convert.common import Params, State, hf_field, reject_if, require

# HF hidden_act -> ours (BERT's MLM transform uses it too; RoBERTa's is always "gelu").
_ACT_FROM_HF = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                "relu": "relu"}
_ACT_TO_HF = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}

# Buffers older checkpoints (e.g. all-MiniLM-L6-v2) still store; they carry no weights.
_IGNORE = (r"embeddings\.position_ids$", r"embeddings\.token_type_ids$")

_MLM_PARAMS = ("mlm_dense", "mlm_norm", "mlm_bias")


def _fields(roberta: bool) -> t.Fields:
  offset = (t.Rule("position_offset", lambda c: c.position_offset >= 1,
                   ">= 1 (pad_token_id + 1: RoBERTa positions start after the padding row)"),)
  return t.Fields(
      fixed={"family": "encoder", "positions": "learned", "norm": "layernorm",
             "post_norm": True, "embed_norm": True, "use_bias": True, "scale_attention": True,
             **({} if roberta else {"position_offset": 0})},
      allowed={"activation": tuple(_ACT_TO_HF)},
      rules=(t.DENSE, t.NO_GQA, t.HEAD_DIM,
             t.Rule("type_vocab_size", lambda c: c.type_vocab_size >= 1,
                    ">= 1 (BERT-style embeddings always add a token-type row)"),
             *(offset if roberta else ())),
      carried=("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len",
               "norm_eps", "type_vocab_size", *(("position_offset",) if roberta else ())),
      # The Encoder's MLM head always reuses the token embedding, whatever tie_embeddings.
      unused=("tie_embeddings", "rope_theta", "num_decoder_layers", "relative_buckets",
              "relative_max_distance", *t.MOE_KNOBS))


class EncoderFamily:
  """One HF encoder model type; quacks like the gpt2 / llama family modules.

  `base` is the encoder's attribute in *ForMaskedLM ("bert", "roberta"); `mlm` names the
  MLM head's dense, norm, bias and decoder in HF.
  """

  LLM_FAMILY = "encoder"

  def __init__(self, model_type: str, base: str, mlm: dict[str, str], classes: str):
    self.MODEL_TYPE = model_type
    self.FIELDS = _fields(roberta=model_type == "roberta")
    self._base = base
    self._mlm = mlm
    self._classes = classes  # "Bert" -> BertConfig, BertModel, BertForMaskedLM

  def __repr__(self):
    return f"EncoderFamily({self.MODEL_TYPE!r})"

  # --- what differs between BERT and RoBERTa: positions, the MLM head's activation ---

  @property
  def _roberta(self) -> bool:
    return self.MODEL_TYPE == "roberta"

  def _position_offset(self, hf: Any) -> int:
    if not self._roberta:
      return 0
    pad = hf_field(hf, "pad_token_id")
    require(pad is not None and pad >= 0, f"roberta config.pad_token_id={pad!r} is not "
            "supported: RoBERTa positions start at pad_token_id + 1")
    return int(pad) + 1

  def _check_mlm_activation(self, cfg: ModelConfig) -> None:
    # HF's RobertaLMHead applies the exact GELU whatever hidden_act says; our MLM head uses
    # cfg.activation (llm/models/encoder.py, Encoder._mlm_head), so they agree only here.
    require(not self._roberta or cfg.activation == "gelu_exact",
            f"roberta MLM head with activation={cfg.activation!r} (hidden_act="
            f"{_ACT_TO_HF.get(cfg.activation)!r}) is not supported: RobertaLMHead always uses "
            "exact GELU while llm's MLM head uses config.model.activation")

  # --- config ---

  def config_from_hf(self, hf: Any, scan_layers: bool) -> ModelConfig:
    mt = self.MODEL_TYPE
    act = hf_field(hf, "hidden_act")
    require(act in _ACT_FROM_HF, f"{mt} config.hidden_act={act!r} is not supported; "
            f"supported: {', '.join(_ACT_FROM_HF)}")
    reject_if(hf, mt, "position_embedding_type", lambda v: v not in (None, "absolute"),
              "llm Encoder has learned absolute positions only")
    reject_if(hf, mt, "is_decoder", bool, "llm Encoder is bidirectional only")
    reject_if(hf, mt, "add_cross_attention", bool, "llm Encoder blocks are self-attention only")
    reject_if(hf, mt, "type_vocab_size", lambda v: v is None or v < 1,
              "BERT-style embeddings always add a token-type row")
    d, n = hf.hidden_size, hf.num_attention_heads
    require(d % n == 0, f"{mt} config.hidden_size={d} is not divisible by "
            f"config.num_attention_heads={n}")
    offset = self._position_offset(hf)
    require(hf.max_position_embeddings > offset, f"{mt} config.max_position_embeddings="
            f"{hf.max_position_embeddings} leaves no positions after the offset {offset}")
    return t.build_config(
        mt, self.FIELDS, vocab_size=hf.vocab_size, d_model=d, num_layers=hf.num_hidden_layers,
        num_heads=n, num_kv_heads=n, head_dim=d // n, d_ff=hf.intermediate_size,
        max_len=hf.max_position_embeddings - offset, norm_eps=float(hf.layer_norm_eps),
        activation=_ACT_FROM_HF[act], tie_embeddings=True, dropout=0.0,
        scan_layers=scan_layers, type_vocab_size=int(hf.type_vocab_size),
        **({"position_offset": offset} if self._roberta else {}))

  def config_to_hf(self, cfg: ModelConfig):
    import transformers
    extra = {}
    if self._roberta:
      extra["pad_token_id"] = cfg.position_offset - 1
      # RobertaConfig's default bos/eos (0, 2) are tokenizer business; keep them if valid.
      for name, default in (("bos_token_id", 0), ("eos_token_id", 2)):
        extra[name] = default if default < cfg.vocab_size else None
    return getattr(transformers, f"{self._classes}Config")(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.d_ff,
        hidden_act=_ACT_TO_HF[cfg.activation], hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_len + cfg.position_offset,
        type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
        tie_word_embeddings=True, **extra)

  # --- model classes ---

  def model_class(self):
    """The MLM model class (what a full pretraining checkpoint is)."""
    import transformers
    return getattr(transformers, f"{self._classes}ForMaskedLM")

  def model_class_for(self, hf_config: Any):
    """The class a torch-only (pytorch_model.bin) checkpoint was saved from."""
    import transformers
    archs = hf_field(hf_config, "architectures") or [f"{self._classes}ForMaskedLM"]
    supported = (f"{self._classes}Model", f"{self._classes}ForMaskedLM")
    require(archs[0] in supported, f"{self.MODEL_TYPE} config.architectures={archs!r} is not "
            f"supported; supported: {', '.join(supported)}")
    return getattr(transformers, archs[0])

  def hf_model(self, cfg: ModelConfig, state: State):
    """A fresh HF model whose state dict has exactly the keys of `state` (from state_to_hf)."""
    import transformers
    hf_config = self.config_to_hf(cfg)
    if self._mlm["bias"] in state:
      return self.model_class()(hf_config)
    model_cls = getattr(transformers, f"{self._classes}Model")
    return model_cls(hf_config, add_pooling_layer="pooler.dense.weight" in state)

  # --- weights ---

  def tensors(self, cfg: ModelConfig, mlm: bool, pooler: bool,
              drop_pooler: bool = False) -> list[t.Entry]:
    """Names as in *ForMaskedLM (`bert.`-prefixed); `mlm` / `pooler`: which heads there are.
    *ForMaskedLM has no pooler, so exporting an MLM head leaves ours out (`drop_pooler`;
    MLM does not train it, and it cannot change the MLM logits)."""
    d, n, h, f = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff
    e, m = f"{self._base}.embeddings", self._mlm
    block = [*t.linear("attn/query", "attention.self.query", (d,), (n, h), bias=True),
             *t.linear("attn/key", "attention.self.key", (d,), (n, h), bias=True),
             *t.linear("attn/value", "attention.self.value", (d,), (n, h), bias=True),
             *t.linear("attn/out", "attention.output.dense", (n, h), (d,), bias=True),
             *t.norm("attn_norm", "attention.output.LayerNorm"),
             *t.linear("mlp/wi", "intermediate.dense", (d,), (f,), bias=True),
             *t.linear("mlp/wo", "output.dense", (f,), (d,), bias=True),
             *t.norm("mlp_norm", "output.LayerNorm")]
    out = [*t.same("pos_embed/embedding", f"{e}.position_embeddings.weight"),
           *t.same("type_embed/embedding", f"{e}.token_type_embeddings.weight"),
           *t.norm("embed_norm", f"{e}.LayerNorm"),
           *t.per_layer(cfg.num_layers, f"{self._base}.encoder.layer.{{i}}", block)]
    if mlm:
      untied = ("an untied MLM decoder is not supported (llm Encoder's MLM head always "
                "reuses the token embedding and mlm_bias)")
      out += [t.Tied("embed/embedding", (f"{e}.word_embeddings.weight",
                                         f"{m['decoder']}.weight"), untied),
              *t.linear("mlm_dense", m["dense"], (d,), (d,), bias=True),
              *t.norm("mlm_norm", m["norm"]),
              t.Tied("mlm_bias", (m["bias"], f"{m['decoder']}.bias"), untied)]
    else:
      out += t.same("embed/embedding", f"{e}.word_embeddings.weight")
    if pooler:
      out += (t.left_out("pooler/kernel", "pooler/bias") if drop_pooler else
              t.linear("pooler", f"{self._base}.pooler.dense", (d,), (d,), bias=True))
    return out

  def _with_base_prefix(self, state: State) -> State:
    """Base-model checkpoints (BertModel, all-MiniLM) omit the `bert.` of *ForMaskedLM."""
    base = self._base + "."
    if any(k.startswith(base) for k in state):
      return state
    head = self._mlm["dense"].split(".")[0] + "."
    return {(k if k.startswith(head) else base + k): v for k, v in state.items()}

  def params_from_hf(self, state: State, cfg: ModelConfig) -> Params:
    state = self._with_base_prefix(state)
    m = self._mlm
    present = [f"{m['dense']}.weight" in state, f"{m['norm']}.weight" in state,
               m["bias"] in state]
    require(all(present) or not any(present), f"{self.MODEL_TYPE} checkpoint has a partial "
            f"MLM head (needs {m['dense']}, {m['norm']} and {m['bias']})")
    if all(present):
      self._check_mlm_activation(cfg)
    pooler = f"{self._base}.pooler.dense.weight" in state
    return t.params_from_hf(self.tensors(cfg, all(present), pooler), state, self.MODEL_TYPE,
                            cfg.scan_layers, _IGNORE)

  def state_to_hf(self, cfg: ModelConfig, params: Params) -> State:
    has_mlm = [k in params for k in _MLM_PARAMS]
    require(all(has_mlm) or not any(has_mlm),
            f"params hold a partial MLM head (need all of {', '.join(_MLM_PARAMS)})")
    mlm = all(has_mlm)
    if mlm:
      self._check_mlm_activation(cfg)
    entries = self.tensors(cfg, mlm, "pooler" in params, drop_pooler=mlm)
    state = t.params_to_hf(entries, params, self.MODEL_TYPE)
    if mlm:  # *ForMaskedLM
      return state
    base = self._base + "."  # *Model: no prefix
    return {k[len(base):] if k.startswith(base) else k: v for k, v in state.items()}


BERT = EncoderFamily(
    "bert", base="bert", classes="Bert",
    mlm={"dense": "cls.predictions.transform.dense", "norm": "cls.predictions.transform.LayerNorm",
         "bias": "cls.predictions.bias", "decoder": "cls.predictions.decoder"})
ROBERTA = EncoderFamily(
    "roberta", base="roberta", classes="Roberta",
    mlm={"dense": "lm_head.dense", "norm": "lm_head.layer_norm", "bias": "lm_head.bias",
         "decoder": "lm_head.decoder"})
