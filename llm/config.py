"""Validated, frozen run configuration.

Experiment files (`configs/*.py`) return `ml_collections.ConfigDict`s so that any
field can be overridden from the command line; `from_configdict` turns one into the
frozen dataclasses below at the boundary, so the library never sees a typo. Every
error is one line that names the field and says what would be valid.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from typing import Any, Mapping, Optional


class ConfigError(ValueError):
  """A config field is unknown, ill-typed or out of range."""


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-experts MLP, used in every `every`-th layer when num_experts > 0."""

  num_experts: int = 0  # 0 = dense model
  top_k: int = 2  # 1 = Switch, 2 = Mixtral
  every: int = 1  # layer i is MoE when (i + 1) % every == 0
  capacity_factor: float = 1.25  # slots per expert = capacity_factor * tokens * top_k / E
  aux_loss_weight: float = 0.01  # load balancing (Switch / GShard)
  z_loss_weight: float = 0.001  # router z-loss (ST-MoE)
  renormalize: bool = True  # top-k gate weights sum to 1 (Mixtral); False keeps softmax probs


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Parameter-efficient adaptation (`llm.peft`); `method` picks what is trainable."""

  method: str = "full"  # full | lora | prompt | adapter | bitfit
  lora_rank: int = 8
  lora_alpha: float = 16.0  # the update is (alpha / rank) * x A B
  lora_dropout: float = 0.0
  lora_targets: str = r"/(query|key|value|out|wi|wi_gate|wi_up|wo)$"  # regex on module paths
  prompt_length: int = 16  # soft-prompt (virtual) tokens prepended to the input
  prompt_init: str = "vocab"  # vocab (copies of random vocabulary embeddings) | random
  adapter_dim: int = 16  # bottleneck width of the adapters after attention and MLP


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """One config for all model families (decoder now; encoder/enc-dec/MoE extend it)."""

  family: str = "decoder"  # decoder | encoder | encoder_decoder
  vocab_size: int = 2048
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 0  # 0 -> num_heads (multi-head); < num_heads -> GQA / MQA
  head_dim: int = 0  # 0 -> d_model // num_heads
  d_ff: int = 512
  max_len: int = 256  # context window (learned-position table size)
  positions: str = "learned"  # learned | rope | relative (T5 bias) | alibi (BLOOM) | none
  rope_theta: float = 10000.0
  norm: str = "layernorm"  # layernorm | rmsnorm
  norm_eps: float = 1e-5
  activation: str = "gelu"  # gelu (tanh approx., GPT-2) | gelu_exact | relu | swiglu | geglu
  use_bias: bool = True
  tie_embeddings: bool = True
  dropout: float = 0.0
  init_std: float = 0.02
  dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"  # none | full | dots (save matmul outputs, recompute the rest)
  # Encoder / encoder-decoder families (BERT, RoBERTa, T5, BART).
  num_decoder_layers: int = 0  # encoder_decoder: decoder depth (0 -> num_layers)
  post_norm: bool = False  # BERT / BART: normalize after each residual add
  embed_norm: bool = False  # BERT / BART: LayerNorm on the summed embeddings
  type_vocab_size: int = 0  # BERT token-type (segment A/B) embeddings; 0 = none
  position_offset: int = 0  # RoBERTa / BART learned positions start at this table row
  scale_attention: bool = True  # False for T5 (the 1/sqrt(H) is folded into its init)
  relative_buckets: int = 32  # T5 relative-position bias buckets
  relative_max_distance: int = 128
  moe: MoEConfig = MoEConfig()
  peft: PeftConfig = PeftConfig()

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "embedded"  # embedded | text:PATH[,PATH] | jsonl:PATH | tfds:NAME
  data_dir: Optional[str] = None  # TFDS data_dir
  tfds_download: bool = False  # TFDS never downloads unless asked
  text_key: str = "text"  # JSONL / TFDS feature holding the text
  train_split: str = "train"
  eval_split: str = "validation"
  seq_len: int = 128
  batch_size: int = 16  # global batch, in rows
  tokenizer_path: Optional[str] = None  # an existing sentencepiece .model; else trained
  num_sentinels: int = 100  # ids reserved for span-corruption sentinels
  max_documents: int = 0  # 0 = all
  shuffle_seed: int = 0
  objective: str = "clm"  # clm | mlm | prefix_lm | span (T5 span corruption) | sft
  # sft: comma-separated tasks, each `name[:rate]`: a generated task (llm.data.tasks),
  # tfds:NAME or jsonl:PATH; rates weigh the multitask mixture (default: by size).
  tasks: str = ""
  prompt_key: str = "prompt"  # jsonl tasks: the record fields holding prompt / completion
  completion_key: str = "completion"
  mlm_probability: float = 0.15  # share of tokens selected for the MLM loss
  mlm_mask_ratio: float = 0.8  # of those: replaced by <mask>
  mlm_random_ratio: float = 0.1  # replaced by a random token (the rest are kept)
  whole_word_masking: bool = False
  noise_density: float = 0.15  # span corruption: share of tokens noised
  mean_span_length: float = 3.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 200
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0
  microbatches: int = 1  # gradient accumulation: the batch is split into this many
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 8
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  peak_flops: float = 0.0  # per device; 0 -> measured with a matmul at start
  num_samples: int = 3  # samples printed at the end of training
  sample_tokens: int = 32
  # Start from a pretraining workdir or a Hugging Face checkpoint directory instead of
  # random init; the model config then comes from there (peft and dropout from this run).
  init_from: str = ""
  # Regex over param paths ("layers/attn/query/kernel") selecting the trainable params;
  # "" = what model.peft.method trains (full: all; lora: lora_a/b; prompt: soft_prompt; ...).
  trainable: str = ""


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  data: int = -1  # -1: all devices not used by the other axes
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class AlignConfig:
  """Preference tuning (`llm.align`): reward model, DPO, PPO with a KL penalty."""

  # Preference pairs: a generated task with a hidden rule (llm.data.preferences) or
  # jsonl:PATH of ranking / pairwise / thumbs records.
  preferences: str = "review"
  dpo_beta: float = 0.1  # DPO: strength of the implicit KL to the reference
  rater: str = ""  # PPO: the reward model's workdir (experiments.reward_model)
  kl_coef: float = 0.1  # PPO: coefficient of the per-token KL to the reference; 0 = none
  kl_target: float = 0.0  # > 0: adaptive coefficient (Ziegler et al.) steering KL/response here
  kl_horizon: int = 10000  # adaptive controller's horizon, in sampled responses
  rollout_batch: int = 64  # prompts per rollout; train.steps counts rollouts
  response_len: int = 24  # max new tokens per response
  temperature: float = 1.0  # rollout sampling temperature
  ppo_epochs: int = 4  # passes over each rollout batch
  ppo_minibatches: int = 4  # optimizer updates per pass
  clip_eps: float = 0.2  # PPO ratio clip
  value_clip: float = 0.2  # value-prediction clip around the rollout's values
  value_coef: float = 0.5
  entropy_coef: float = 0.0
  gamma: float = 1.0
  gae_lambda: float = 0.95


@dataclasses.dataclass(frozen=True)
class CompressConfig:
  """Distillation and pruning (`llm.compress`)."""

  teacher: str = ""  # distillation: the teacher's workdir (same tokenizer as the student)
  distill_alpha: float = 0.5  # weight of the soft-label KL; 1 - alpha on the hard labels
  distill_temperature: float = 2.0
  sparsities: str = "0,0.25,0.5,0.75,0.9"  # pruning: target shares of zero weights
  prune_scopes: str = "global,layer"  # global and/or layer (each matrix to the sparsity)
  nm: str = "2:4"  # N:M structured sparsity (N non-zeros in every M); "" to skip


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  parallel: ParallelConfig = ParallelConfig()
  align: AlignConfig = AlignConfig()
  compress: CompressConfig = CompressConfig()


_NESTED = {"MoEConfig": MoEConfig, "PeftConfig": PeftConfig}
_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
             "parallel": ParallelConfig, "align": AlignConfig, "compress": CompressConfig}
_CHOICES = {
    "model.family": ("decoder", "encoder", "encoder_decoder"),
    "model.positions": ("learned", "rope", "relative", "alibi", "none"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.activation": ("gelu", "gelu_exact", "relu", "swiglu", "geglu"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots"),
    "model.peft.method": ("full", "lora", "prompt", "adapter", "bitfit"),
    "model.peft.prompt_init": ("vocab", "random"),
}


def _check_type(name: str, value: Any, annotation: Any) -> Any:
  """Returns `value` coerced to `annotation` (int->float only) or raises ConfigError.

  Annotations arrive as strings (postponed evaluation), hence the lookup table.
  """
  ann = {"int": int, "float": float, "str": str, "bool": bool,
         "Optional[str]": Optional[str], "Optional[int]": Optional[int]}.get(annotation, annotation)
  origin = typing.get_origin(ann)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(ann)
    if value is None and type(None) in args:
      return None
    ann = next(a for a in args if a is not type(None))
  if ann is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if ann is bool and not isinstance(value, bool):
    raise ConfigError(f"config.{name}={value!r}: expected true/false")
  if ann is int and (isinstance(value, bool) or not isinstance(value, int)):
    raise ConfigError(f"config.{name}={value!r}: expected an integer")
  if not isinstance(value, ann):
    raise ConfigError(f"config.{name}={value!r}: expected {ann.__name__}")
  return value


def _build(cls, section: str, values: Mapping[str, Any]):
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    if key not in fields:
      raise ConfigError(f"config.{section}.{key}: unknown field; valid fields: "
                        f"{', '.join(sorted(fields))}")
    nested = _NESTED.get(fields[key].type)
    if nested is not None:
      if isinstance(value, nested):
        kwargs[key] = value
        continue
      if not isinstance(value, Mapping):
        raise ConfigError(f"config.{section}.{key}: expected a group of fields, got {value!r}")
      kwargs[key] = _build(nested, f"{section}.{key}", value)
      continue
    kwargs[key] = _check_type(f"{section}.{key}", value, fields[key].type)
    choices = _CHOICES.get(f"{section}.{key}")
    if choices and kwargs[key] not in choices:
      raise ConfigError(f"config.{section}.{key}={value!r}: must be one of {', '.join(choices)}")
  return cls(**kwargs)


def _require(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def validate_model(m: ModelConfig) -> ModelConfig:
  for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len"):
    _require(getattr(m, name) > 0, f"config.model.{name}={getattr(m, name)}: must be > 0")
  _require(m.head_dim > 0 or m.d_model % m.num_heads == 0,
           f"config.model.d_model={m.d_model} is not divisible by num_heads={m.num_heads}; "
           "change one or set model.head_dim")
  _require(m.kv_heads <= m.num_heads and m.num_heads % m.kv_heads == 0,
           f"config.model.num_kv_heads={m.num_kv_heads}: must divide num_heads={m.num_heads}")
  _require(not (m.positions == "rope" and m.dim_per_head % 2),
           f"config.model.head_dim={m.dim_per_head}: RoPE needs an even head dim")
  _require(0.0 <= m.dropout < 1.0, f"config.model.dropout={m.dropout}: must be in [0, 1)")
  e = m.moe
  if e.num_experts:
    _require(1 <= e.top_k <= e.num_experts,
             f"config.model.moe.top_k={e.top_k}: must be in [1, num_experts={e.num_experts}]")
    _require(e.capacity_factor > 0,
             f"config.model.moe.capacity_factor={e.capacity_factor}: must be > 0")
    _require(e.every >= 1, f"config.model.moe.every={e.every}: must be >= 1")
    for name in ("num_layers", "num_decoder_layers"):
      depth = getattr(m, name)
      _require(not m.scan_layers or depth % e.every == 0,
               f"config.model.moe.every={e.every}: must divide model.{name}={depth} when "
               "scan_layers (the scan repeats groups of `every` layers)")
  p = m.peft
  _require(p.lora_rank > 0, f"config.model.peft.lora_rank={p.lora_rank}: must be > 0")
  _require(0.0 <= p.lora_dropout < 1.0,
           f"config.model.peft.lora_dropout={p.lora_dropout}: must be in [0, 1)")
  _require(p.prompt_length > 0,
           f"config.model.peft.prompt_length={p.prompt_length}: must be > 0")
  _require(p.adapter_dim > 0, f"config.model.peft.adapter_dim={p.adapter_dim}: must be > 0")
  try:
    re.compile(p.lora_targets)
  except re.error as e:
    raise ConfigError(f"config.model.peft.lora_targets={p.lora_targets!r}: not a regex ({e})")
  return m


def validate(cfg: Config) -> Config:
  validate_model(cfg.model)
  d, t = cfg.data, cfg.train
  _require(d.seq_len > 1, f"config.data.seq_len={d.seq_len}: must be > 1")
  _require(d.seq_len <= cfg.model.max_len or cfg.model.positions != "learned",
           f"config.data.seq_len={d.seq_len} exceeds config.model.max_len={cfg.model.max_len}; "
           "lower seq_len or raise max_len")
  _require(d.batch_size > 0, f"config.data.batch_size={d.batch_size}: must be > 0")
  _require(0.0 < d.mlm_probability < 1.0,
           f"config.data.mlm_probability={d.mlm_probability}: must be in (0, 1)")
  _require(0.0 < d.noise_density < 1.0,
           f"config.data.noise_density={d.noise_density}: must be in (0, 1)")
  _require(d.mean_span_length >= 1.0,
           f"config.data.mean_span_length={d.mean_span_length}: must be >= 1")
  from llm.objectives import OBJECTIVES  # the registry imports this module
  _require(d.objective in OBJECTIVES,
           f"config.data.objective={d.objective!r}: must be one of {', '.join(OBJECTIVES)}")
  families = OBJECTIVES[d.objective].families
  _require(cfg.model.family in families,
           f"config.data.objective={d.objective!r} trains a {' or '.join(families)} model, "
           f"but config.model.family={cfg.model.family!r}; change one of them")
  _require(d.objective != "sft" or d.tasks,
           "config.data.tasks is empty: the sft objective needs tasks, e.g. "
           "--config.data.tasks=arithmetic or tfds:samsum or jsonl:/data/train.jsonl")
  try:
    re.compile(t.trainable)
  except re.error as e:
    raise ConfigError(f"config.train.trainable={t.trainable!r}: not a regex ({e})")
  _require(t.steps > 0, f"config.train.steps={t.steps}: must be > 0")
  _require(t.microbatches > 0 and d.batch_size % t.microbatches == 0,
           f"config.train.microbatches={t.microbatches}: must divide "
           f"data.batch_size={d.batch_size}")
  _require(t.learning_rate > 0, f"config.train.learning_rate={t.learning_rate}: must be > 0")
  _require(0 <= t.warmup_steps, f"config.train.warmup_steps={t.warmup_steps}: must be >= 0")
  _require(t.keep_checkpoints > 0,
           f"config.train.keep_checkpoints={t.keep_checkpoints}: must be > 0")
  for axis in ("fsdp", "tensor"):
    _require(getattr(cfg.parallel, axis) > 0, f"config.parallel.{axis}: must be > 0")
  validate_align(cfg.align, cfg.compress)
  return cfg


def validate_align(a: AlignConfig, c: CompressConfig) -> None:
  _require(a.kl_coef >= 0, f"config.align.kl_coef={a.kl_coef}: must be >= 0 (0 = no KL penalty)")
  _require(a.kl_target >= 0, f"config.align.kl_target={a.kl_target}: must be >= 0 "
           "(0 = fixed kl_coef)")
  _require(a.dpo_beta > 0, f"config.align.dpo_beta={a.dpo_beta}: must be > 0")
  for name in ("kl_horizon", "rollout_batch", "response_len", "ppo_epochs", "ppo_minibatches"):
    _require(getattr(a, name) > 0, f"config.align.{name}={getattr(a, name)}: must be > 0")
  _require(a.rollout_batch % a.ppo_minibatches == 0,
           f"config.align.ppo_minibatches={a.ppo_minibatches}: must divide "
           f"align.rollout_batch={a.rollout_batch}")
  _require(a.temperature > 0, f"config.align.temperature={a.temperature}: must be > 0")
  _require(0.0 < a.clip_eps < 1.0, f"config.align.clip_eps={a.clip_eps}: must be in (0, 1)")
  _require(0.0 <= a.gamma <= 1.0 and 0.0 <= a.gae_lambda <= 1.0,
           "config.align.gamma / gae_lambda: must be in [0, 1]")
  _require(0.0 <= c.distill_alpha <= 1.0,
           f"config.compress.distill_alpha={c.distill_alpha}: must be in [0, 1]")
  _require(c.distill_temperature > 0,
           f"config.compress.distill_temperature={c.distill_temperature}: must be > 0")


def from_configdict(cd: Any) -> Config:
  """Builds and validates a `Config` from a ConfigDict / nested mapping."""
  values = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
  sections = {}
  for key, value in values.items():
    if key not in _SECTIONS:
      raise ConfigError(f"config.{key}: unknown section; valid sections: {', '.join(_SECTIONS)}")
    if not isinstance(value, Mapping):
      raise ConfigError(f"config.{key}: expected a group of fields, got {value!r}")
    sections[key] = _build(_SECTIONS[key], key, value)
  return validate(Config(**sections))


def model_from_dict(values: Mapping[str, Any]) -> ModelConfig:
  return validate_model(_build(ModelConfig, "model", values))


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


def to_json(cfg) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def from_json(text: str) -> Config:
  return from_configdict(json.loads(text))


def default_configdict():
  """A ConfigDict holding every field at its default, so that experiment files set only
  what differs and `--config.section.field=value` can override any field."""
  import ml_collections
  from ml_collections.config_dict import placeholder

  def group_of(cls):
    group = ml_collections.ConfigDict()
    for f in dataclasses.fields(cls):
      value = getattr(cls(), f.name)
      if dataclasses.is_dataclass(value):
        group[f.name] = group_of(type(value))
      elif value is None:  # a typed placeholder keeps the field overridable from flags
        group[f.name] = placeholder(str if "str" in f.type else int)
      else:
        group[f.name] = value
    return group

  cd = ml_collections.ConfigDict()
  for section, cls in _SECTIONS.items():
    cd[section] = group_of(cls)
  return cd
