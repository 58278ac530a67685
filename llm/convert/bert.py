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

import numpy as np

from llm.config import ModelConfig, validate_model
from llm.convert.common import (Params, State, StateReader, hf_field, reject_if, require,
                                stack_layers, unstack_layers)

# HF hidden_act -> ours (BERT's MLM transform uses it too; RoBERTa's is always "gelu").
_ACT_FROM_HF = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                "relu": "relu"}
_ACT_TO_HF = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}

# Buffers older checkpoints (e.g. all-MiniLM-L6-v2) still store; they carry no weights.
_IGNORE = (r"embeddings\.position_ids$", r"embeddings\.token_type_ids$")

_MLM_PARAMS = ("mlm_dense", "mlm_norm", "mlm_bias")


def _linear_from_hf(get, name: str, in_shape: tuple, out_shape: tuple) -> Params:
  # torch Linear weights are (out, in); our kernels are (in..., out...).
  return {"kernel": get(f"{name}.weight").T.reshape(*in_shape, *out_shape),
          "bias": get(f"{name}.bias").reshape(out_shape)}


def _linear_to_hf(name: str, p: Params, size_in: int, size_out: int) -> State:
  return {f"{name}.weight": p["kernel"].reshape(size_in, size_out).T,
          f"{name}.bias": p["bias"].reshape(size_out)}


def _norm_from_hf(get, name: str) -> Params:
  return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}


def _norm_to_hf(name: str, p: Params) -> State:
  return {f"{name}.weight": p["scale"], f"{name}.bias": p["bias"]}


class EncoderFamily:
  """One HF encoder model type; quacks like the gpt2 / llama family modules.

  `base` is the encoder's attribute in *ForMaskedLM ("bert", "roberta"); `mlm` names the
  MLM head's dense, norm, bias and decoder in HF.
  """

  LLM_FAMILY = "encoder"

  def __init__(self, model_type: str, base: str, mlm: dict[str, str], classes: str):
    self.MODEL_TYPE = model_type
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
    return validate_model(ModelConfig(
        family="encoder", vocab_size=hf.vocab_size, d_model=d, num_layers=hf.num_hidden_layers,
        num_heads=n, num_kv_heads=n, head_dim=d // n, d_ff=hf.intermediate_size,
        max_len=hf.max_position_embeddings - offset, positions="learned", norm="layernorm",
        norm_eps=float(hf.layer_norm_eps), activation=_ACT_FROM_HF[act], use_bias=True,
        # The Encoder's MLM decoder is always the token embedding; params_from_hf checks it.
        tie_embeddings=True, dropout=0.0, scan_layers=scan_layers, post_norm=True,
        embed_norm=True, type_vocab_size=int(hf.type_vocab_size), position_offset=offset))

  def hf_problems(self, cfg: ModelConfig) -> list[str]:
    """Why this model type cannot express `cfg` (empty when it can)."""
    mt = self.MODEL_TYPE
    offset_ok = cfg.position_offset >= 1 if self._roberta else cfg.position_offset == 0
    checks = [
        (cfg.family == "encoder", f"family={cfg.family!r} ({mt} needs 'encoder')"),
        (cfg.positions == "learned", f"positions={cfg.positions!r} ({mt} needs 'learned')"),
        (offset_ok, f"position_offset={cfg.position_offset} ({mt} needs "
                    f"{'>= 1 (pad_token_id + 1)' if self._roberta else '0'})"),
        (cfg.norm == "layernorm", f"norm={cfg.norm!r} ({mt} needs 'layernorm')"),
        (cfg.post_norm, f"post_norm=False ({mt} blocks are post-norm)"),
        (cfg.embed_norm, f"embed_norm=False ({mt} normalizes the embeddings)"),
        (cfg.use_bias, f"use_bias=False ({mt} always has biases)"),
        (cfg.type_vocab_size >= 1, f"type_vocab_size={cfg.type_vocab_size} ({mt} always has "
                                   "token-type embeddings)"),
        (cfg.activation in _ACT_TO_HF, f"activation={cfg.activation!r} ({mt} supports "
                                       f"{', '.join(_ACT_TO_HF)})"),
        (cfg.kv_heads == cfg.num_heads, f"num_kv_heads={cfg.num_kv_heads} ({mt} has no GQA)"),
        (cfg.dim_per_head * cfg.num_heads == cfg.d_model,
         f"head_dim={cfg.head_dim} ({mt} needs d_model / num_heads)"),
        (cfg.scale_attention, f"scale_attention=False ({mt} scales by 1/sqrt(head_dim))"),
        (not cfg.moe.num_experts, f"moe.num_experts={cfg.moe.num_experts} ({mt} is dense)"),
    ]
    return [why for ok, why in checks if not ok]

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

  def _with_base_prefix(self, state: State) -> State:
    """Base-model checkpoints (BertModel, all-MiniLM) omit the `bert.` of *ForMaskedLM."""
    base = self._base + "."
    if any(k.startswith(base) for k in state):
      return state
    head = self._mlm["dense"].split(".")[0] + "."
    return {(k if k.startswith(head) else base + k): v for k, v in state.items()}

  def _block_from_hf(self, get, cfg: ModelConfig, i: int) -> Params:
    p = f"{self._base}.encoder.layer.{i}"
    d, n, h, f = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff
    return {
        "attn": {"query": _linear_from_hf(get, f"{p}.attention.self.query", (d,), (n, h)),
                 "key": _linear_from_hf(get, f"{p}.attention.self.key", (d,), (n, h)),
                 "value": _linear_from_hf(get, f"{p}.attention.self.value", (d,), (n, h)),
                 "out": _linear_from_hf(get, f"{p}.attention.output.dense", (n, h), (d,))},
        "attn_norm": _norm_from_hf(get, f"{p}.attention.output.LayerNorm"),
        "mlp": {"wi": _linear_from_hf(get, f"{p}.intermediate.dense", (d,), (f,)),
                "wo": _linear_from_hf(get, f"{p}.output.dense", (f,), (d,))},
        "mlp_norm": _norm_from_hf(get, f"{p}.output.LayerNorm"),
    }

  def _check_tied(self, get, name: str, tied_to: np.ndarray, what: str) -> None:
    if get.has(name):
      require(np.array_equal(get(name), tied_to), f"{self.MODEL_TYPE} checkpoint's {name} "
              f"differs from {what}: an untied MLM decoder is not supported (llm Encoder's "
              "MLM head always reuses the token embedding and mlm_bias)")

  def params_from_hf(self, state: State, cfg: ModelConfig) -> Params:
    state = self._with_base_prefix(state)
    get = StateReader(state, self.MODEL_TYPE, _IGNORE)
    e = f"{self._base}.embeddings"
    d = cfg.d_model
    params = {"embed": {"embedding": get(f"{e}.word_embeddings.weight")},
              "pos_embed": {"embedding": get(f"{e}.position_embeddings.weight")},
              "type_embed": {"embedding": get(f"{e}.token_type_embeddings.weight")},
              "embed_norm": _norm_from_hf(get, f"{e}.LayerNorm"),
              **stack_layers([self._block_from_hf(get, cfg, i) for i in range(cfg.num_layers)],
                             cfg.scan_layers)}
    pooler = f"{self._base}.pooler.dense"
    if get.has(f"{pooler}.weight"):
      params["pooler"] = _linear_from_hf(get, pooler, (d,), (d,))
    m = self._mlm
    present = [get.has(f"{m['dense']}.weight"), get.has(f"{m['norm']}.weight"), get.has(m["bias"])]
    if any(present):
      require(all(present), f"{self.MODEL_TYPE} checkpoint has a partial MLM head (needs "
              f"{m['dense']}, {m['norm']} and {m['bias']})")
      self._check_mlm_activation(cfg)
      params["mlm_dense"] = _linear_from_hf(get, m["dense"], (d,), (d,))
      params["mlm_norm"] = _norm_from_hf(get, m["norm"])
      params["mlm_bias"] = get(m["bias"])
      self._check_tied(get, f"{m['decoder']}.weight", params["embed"]["embedding"],
                       f"{e}.word_embeddings.weight")
      self._check_tied(get, f"{m['decoder']}.bias", params["mlm_bias"], m["bias"])
    get.finish()
    return params

  def state_to_hf(self, cfg: ModelConfig, params: Params) -> State:
    require("classifier" not in params, f"params hold a 'classifier' head: {self.MODEL_TYPE}"
            "ForSequenceClassification is not mapped yet; drop params['classifier'] to export "
            "the encoder")
    has_mlm = [k in params for k in _MLM_PARAMS]
    require(all(has_mlm) or not any(has_mlm),
            f"params hold a partial MLM head (need all of {', '.join(_MLM_PARAMS)})")
    base = f"{self._base}." if all(has_mlm) else ""  # *ForMaskedLM or *Model
    d, f = cfg.d_model, cfg.d_ff
    nh = cfg.num_heads * cfg.dim_per_head
    e = f"{base}embeddings"
    state = {f"{e}.word_embeddings.weight": params["embed"]["embedding"],
             f"{e}.position_embeddings.weight": params["pos_embed"]["embedding"],
             f"{e}.token_type_embeddings.weight": params["type_embed"]["embedding"],
             **_norm_to_hf(f"{e}.LayerNorm", params["embed_norm"])}
    for i, b in enumerate(unstack_layers(params, cfg.num_layers)):
      p = f"{base}encoder.layer.{i}"
      a = b["attn"]
      state.update({
          **_linear_to_hf(f"{p}.attention.self.query", a["query"], d, nh),
          **_linear_to_hf(f"{p}.attention.self.key", a["key"], d, nh),
          **_linear_to_hf(f"{p}.attention.self.value", a["value"], d, nh),
          **_linear_to_hf(f"{p}.attention.output.dense", a["out"], nh, d),
          **_norm_to_hf(f"{p}.attention.output.LayerNorm", b["attn_norm"]),
          **_linear_to_hf(f"{p}.intermediate.dense", b["mlp"]["wi"], d, f),
          **_linear_to_hf(f"{p}.output.dense", b["mlp"]["wo"], f, d),
          **_norm_to_hf(f"{p}.output.LayerNorm", b["mlp_norm"]),
      })
    if all(has_mlm):  # *ForMaskedLM has no pooler: ours, if any, is left out (see top)
      self._check_mlm_activation(cfg)
      m = self._mlm
      state.update({**_linear_to_hf(m["dense"], params["mlm_dense"], d, d),
                    **_norm_to_hf(m["norm"], params["mlm_norm"]),
                    m["bias"]: params["mlm_bias"],
                    f"{m['decoder']}.weight": params["embed"]["embedding"],
                    f"{m['decoder']}.bias": params["mlm_bias"]})
    elif "pooler" in params:
      state.update(_linear_to_hf("pooler.dense", params["pooler"], d, d))
    return state


BERT = EncoderFamily(
    "bert", base="bert", classes="Bert",
    mlm={"dense": "cls.predictions.transform.dense", "norm": "cls.predictions.transform.LayerNorm",
         "bias": "cls.predictions.bias", "decoder": "cls.predictions.decoder"})
ROBERTA = EncoderFamily(
    "roberta", base="roberta", classes="Roberta",
    mlm={"dense": "lm_head.dense", "norm": "lm_head.layer_norm", "bias": "lm_head.bias",
         "decoder": "lm_head.decoder"})

