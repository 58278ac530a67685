"""Validated, frozen run configuration.

Experiment files (`configs/*.py`) return `ml_collections.ConfigDict`s so that any
field can be overridden from the command line; `from_configdict` turns one into the
frozen dataclasses below at the boundary, so the library never sees a typo. Every
error is one line that names the field and says what would be valid.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from typing import Any, Mapping, Optional


class ConfigError(ValueError):
  """A config field is unknown, ill-typed or out of range."""


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-experts MLP, used in every `every`-th layer when num_experts > 0."""

  num_experts: int = 0  # experts per MoE layer; 0 = a dense model
  top_k: int = 2  # experts each token is routed to (1 = Switch, 2 = Mixtral)
  every: int = 1  # layer i is MoE when (i + 1) % every == 0
  capacity_factor: float = 1.25  # slots per expert = capacity_factor * tokens * top_k / E
  aux_loss_weight: float = 0.01  # weight of the load-balancing loss (Switch / GShard)
  z_loss_weight: float = 0.001  # weight of the router z-loss (ST-MoE)
  renormalize: bool = True  # top-k gate weights sum to 1 (Mixtral); False keeps softmax probs


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Parameter-efficient adaptation (`llm.peft`); `method` picks what is trainable."""

  method: str = "full"  # what is trained: full | lora | prompt | prefix | adapter | bitfit
  lora_rank: int = 8  # rank r of the LoRA update x A B (A: d x r, B: r x d)
  lora_alpha: float = 16.0  # the update is (alpha / rank) * x A B
  lora_dropout: float = 0.0  # dropout on the LoRA branch's input, in [0, 1)
  # Regex over module paths of the layers LoRA adapts (every Linear, experts, embedding tables).
  lora_targets: str = r"/(query|key|value|out|wi|wi_gate|wi_up|wo)$"
  # Virtual tokens prepended to the input (prompt: soft embeddings; prefix: per-layer K/V).
  prompt_length: int = 16
  # vocab: start as random real tokens (their embeddings; prefix: their keys/values) | random
  prompt_init: str = "vocab"
  adapter_dim: int = 16  # bottleneck width of the adapters after attention and MLP


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """One config for all model families (decoder now; encoder/enc-dec/MoE extend it)."""

  family: str = "decoder"  # decoder (GPT, LLaMA) | encoder (BERT) | encoder_decoder (T5)
  vocab_size: int = 2048  # tokenizer and embedding size; a small corpus needs a small one
  d_model: int = 128  # width of the residual stream
  num_layers: int = 2  # transformer blocks (the encoder's, for encoder_decoder)
  num_heads: int = 4  # attention (query) heads
  num_kv_heads: int = 0  # 0 -> num_heads (multi-head); < num_heads -> GQA / MQA
  head_dim: int = 0  # 0 -> d_model // num_heads
  d_ff: int = 512  # hidden width of each MLP
  max_len: int = 256  # context window (learned-position table size)
  positions: str = "learned"  # learned | rope | relative (T5 bias) | alibi (BLOOM) | none
  rope_theta: float = 10000.0  # RoPE base frequency
  norm: str = "layernorm"  # layernorm | rmsnorm
  norm_eps: float = 1e-5  # epsilon added to the variance in every norm
  activation: str = "gelu"  # gelu (tanh approx., GPT-2) | gelu_exact | relu | swiglu | geglu
  use_bias: bool = True  # biases in the projections and MLPs (False for LLaMA, T5)
  tie_embeddings: bool = True  # the output head reuses the input embedding
  dropout: float = 0.0  # dropout rate in training, in [0, 1) (0 = none)
  init_std: float = 0.02  # std of the normal init of the weights
  dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
  param_dtype: str = "float32"  # dtype params and optimizer state are kept in
  # nn.scan over layers: compile time does not grow with depth (24 layers: 0.84x of 2's
  # time; unscanned 5.9x, benchmarks/compile_time.py); on the 2-core CPU, 6 layers train
  # no faster unscanned (benchmarks/train_throughput.py --variants scan_layers=False).
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
  relative_max_distance: int = 128  # T5: distances beyond this share the last bucket
  moe: MoEConfig = MoEConfig()  # mixture-of-experts MLPs (model.moe.*)
  peft: PeftConfig = PeftConfig()  # parameter-efficient adaptation (model.peft.*)

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "embedded"  # embedded | text:PATH[,PATH] | jsonl:PATH | tfds:NAME
  # A mixture instead of `source`: ((source, weight), ...), e.g. (("embedded:topics", 1),
  # ("embedded:docstrings", 3)); rows are drawn from each at its share (llm.data.source_mixture).
  sources: tuple = ()
  encoding: str = "utf-8"  # text encoding of local text / JSONL files (e.g. latin-1)
  data_dir: Optional[str] = None  # TFDS data_dir (where prepared datasets are)
  tfds_download: bool = False  # TFDS never downloads unless asked
  text_key: str = "text"  # JSONL / TFDS feature holding the text
  train_split: str = "train"  # the split trained on
  eval_split: str = "validation"  # the split evaluated (and sampled prompts come from)
  seq_len: int = 128  # tokens per training row
  batch_size: int = 16  # global batch, in rows
  tokenizer_path: Optional[str] = None  # an existing sentencepiece .model; else trained
  num_sentinels: int = 100  # ids reserved for span-corruption sentinels
  max_documents: int = 0  # read at most this many documents per split; 0 = all
  # Read text:/jsonl: files (or an array_record tfds: split) lazily, tokenized and packed on
  # the fly, each process its own shard (llm.data.streaming): data larger than memory.
  streaming: bool = False
  shuffle_seed: int = 0  # seed of the batch order, in [0, 2**32)
  objective: str = "clm"  # clm | mlm | prefix_lm | span (T5 span corruption) | sft
  # sft: comma-separated tasks, each `name[:rate]`: a generated task (llm.data.tasks),
  # tfds:NAME or jsonl:PATH; rates weigh the multitask mixture (default: by size).
  tasks: str = ""
  prompt_key: str = "prompt"  # jsonl tasks: the record field holding the prompt
  completion_key: str = "completion"  # jsonl tasks: the record field holding the completion
  mlm_probability: float = 0.15  # MLM: share of tokens selected for the loss
  mlm_mask_ratio: float = 0.8  # MLM: share of the selected replaced by <mask>
  mlm_random_ratio: float = 0.1  # MLM: share replaced by a random token (the rest kept)
  whole_word_masking: bool = False  # MLM: mask all pieces of a word together
  noise_density: float = 0.15  # span corruption: share of tokens noised
  mean_span_length: float = 3.0  # span corruption: mean length of a noised span, in tokens


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 200  # train to this step (a rerun resumes and continues to it)
  learning_rate: float = 3e-3  # peak learning rate, reached after warmup
  warmup_steps: int = 20  # linear warmup to learning_rate over this many steps
  min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
  weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only, not norms / biases)
  b1: float = 0.9  # Adam first-moment decay, in [0, 1)
  b2: float = 0.95  # Adam second-moment decay, in [0, 1)
  eps: float = 1e-8  # Adam epsilon, > 0
  grad_clip: float = 1.0  # clip the global gradient norm to this, > 0
  microbatches: int = 1  # gradient accumulation: the batch is split into this many
  seed: int = 0  # seed of the param init and dropout, in [0, 2**32)
  log_every: int = 10  # steps between train-metric records
  eval_every: int = 100  # steps between evaluations
  eval_batches: int = 8  # validation batches per evaluation
  checkpoint_every: int = 100  # steps between checkpoints
  keep_checkpoints: int = 3  # newest checkpoints kept on disk
  peak_flops: float = 0.0  # per-device FLOP/s for MFU; 0 -> measured at start
  num_samples: int = 3  # samples printed at the end of training
  sample_tokens: int = 32  # tokens generated per end-of-training sample
  # Prompts of those samples, '|'-separated (the first num_samples are used); '' = the
  # first words of the first validation documents of the run's data.
  sample_prompts: str = ""
  # Start from a pretraining workdir or a Hugging Face checkpoint directory instead of
  # random init; the model config then comes from there (peft and dropout from this run).
  init_from: str = ""
  # A Hugging Face init_from directory holding only PyTorch pickles (pytorch_model.bin) is
  # refused, since unpickling can run code; True reads them (only for sources you trust).
  init_from_pickle: bool = False
  # Regex over param paths ("layers/attn/query/kernel") selecting the trainable params;
  # "" = what model.peft.method trains (full: all; lora: lora_a/b; prompt: soft_prompt; ...).
  trainable: str = ""
  # A step whose loss or gradient is not finite is never applied; False stops the run
  # there (before anything is saved), True skips it and goes on (counted in metrics).
  skip_nonfinite: bool = False
  # Resume even though steps / batch / sequence length / data changed since the checkpoint.
  allow_config_change: bool = False
  tensorboard: bool = False  # also write WORKDIR/tensorboard/ event files (tensorboardX)
  # Directory of JAX's persistent compilation cache: a rerun or resume of the same config
  # loads its compiled steps from there instead of recompiling; "" = off (JAX's default).
  compilation_cache_dir: str = ""


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """Mesh axis sizes; one may be -1: the devices the other axes leave."""

  data: int = -1  # devices the batch is split over (-1: those the other axes leave)
  fsdp: int = 1  # devices params, gradients and optimizer state are sharded over (ZeRO-3)
  tensor: int = 1  # devices heads / MLP / vocabulary are split over
  expert: int = 1  # devices MoE experts are split over (the batch too, outside the experts)


# The post-training methods' settings live beside them; Config nests them.
from llm.align.settings import AlignConfig  # noqa: E402
from llm.compress.settings import CompressConfig  # noqa: E402


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
    "model.peft.method": ("full", "lora", "prompt", "prefix", "adapter", "bitfit"),
    "model.peft.prompt_init": ("vocab", "random"),
}
# Fields with a range: "> 0", ">= 1" or an interval such as "[0, 1)". A new field with
# a range adds a row here; cross-field conditions live in validate / validate_model.
RANGES = {
    "model.vocab_size": ">= 1", "model.d_model": ">= 1", "model.num_layers": ">= 1",
    "model.num_heads": ">= 1", "model.num_kv_heads": ">= 0", "model.head_dim": ">= 0",
    "model.d_ff": ">= 1", "model.max_len": ">= 1", "model.rope_theta": "> 0",
    "model.norm_eps": "> 0", "model.dropout": "[0, 1)", "model.init_std": "> 0",
    "model.num_decoder_layers": ">= 0", "model.type_vocab_size": ">= 0",
    "model.position_offset": ">= 0", "model.relative_buckets": ">= 4",
    "model.relative_max_distance": ">= 1",
    "model.moe.num_experts": ">= 0", "model.moe.top_k": ">= 1", "model.moe.every": ">= 1",
    "model.moe.capacity_factor": "> 0", "model.moe.aux_loss_weight": ">= 0",
    "model.moe.z_loss_weight": ">= 0",
    "model.peft.lora_rank": ">= 1", "model.peft.lora_dropout": "[0, 1)",
    "model.peft.prompt_length": ">= 1", "model.peft.adapter_dim": ">= 1",
    "data.seq_len": ">= 2", "data.batch_size": ">= 1", "data.num_sentinels": ">= 0",
    "data.max_documents": ">= 0", "data.shuffle_seed": "[0, 2**32)",
    "data.mlm_probability": "(0, 1)", "data.mlm_mask_ratio": "[0, 1]",
    "data.mlm_random_ratio": "[0, 1]", "data.noise_density": "(0, 1)",
    "data.mean_span_length": ">= 1",
    "train.steps": ">= 1", "train.learning_rate": "> 0", "train.warmup_steps": ">= 0",
    "train.min_lr_ratio": "[0, 1]", "train.weight_decay": ">= 0", "train.b1": "[0, 1)",
    "train.b2": "[0, 1)", "train.eps": "> 0", "train.grad_clip": "> 0",
    "train.microbatches": ">= 1", "train.seed": "[0, 2**32)", "train.log_every": ">= 1",
    "train.eval_every": ">= 1", "train.eval_batches": ">= 1", "train.checkpoint_every": ">= 1",
    "train.keep_checkpoints": ">= 1", "train.peak_flops": ">= 0", "train.num_samples": ">= 0",
    "train.sample_tokens": ">= 1",
    "align.dpo_beta": "> 0", "align.kl_coef": ">= 0", "align.kl_target": ">= 0",
    "align.kl_horizon": ">= 1", "align.rollout_batch": ">= 1", "align.response_len": ">= 1",
    "align.temperature": "> 0", "align.ppo_epochs": ">= 1", "align.ppo_minibatches": ">= 1",
    "align.clip_eps": "(0, 1)", "align.value_clip": "> 0", "align.value_coef": ">= 0",
    "align.entropy_coef": ">= 0", "align.gamma": "[0, 1]", "align.gae_lambda": "[0, 1]",
    "compress.distill_alpha": "[0, 1]", "compress.distill_temperature": "> 0",
}


def in_range(value, spec: str) -> bool:
  """Whether `value` lies in `spec`: "> 0", ">= 1", or an interval like "[0, 1)"."""
  bound = lambda text: 2 ** 32 if text == "2**32" else float(text)
  if spec.startswith(">"):
    op, limit = spec.split()
    return value > bound(limit) if op == ">" else value >= bound(limit)
  low, high = (bound(t.strip()) for t in spec[1:-1].split(","))
  return ((low <= value) if spec[0] == "[" else (low < value)) and (
      (value <= high) if spec[-1] == "]" else (value < high))


def check_range(name: str, value, spec: str):
  """Raises a one-line ConfigError naming `name` unless `value` is in `spec`."""
  if not in_range(value, spec):
    raise ConfigError(f"{name}={value}: must be {spec if spec[0] == '>' else 'in ' + spec}")


def _check_ranges(obj, section: str):
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value):
      _check_ranges(value, f"{section}.{f.name}")
    elif f"{section}.{f.name}" in RANGES:
      check_range(f"config.{section}.{f.name}", value, RANGES[f"{section}.{f.name}"])


def _check_type(name: str, value: Any, annotation: Any) -> Any:
  """Returns `value` coerced to `annotation` (int->float only) or raises ConfigError.

  Annotations arrive as strings (postponed evaluation), hence the lookup table.
  """
  ann = {"int": int, "float": float, "str": str, "bool": bool,
         "Optional[str]": Optional[str], "Optional[int]": Optional[int],
         "tuple": tuple}.get(annotation, annotation)
  if ann is tuple and isinstance(value, list):  # JSON (a saved config) has no tuples
    value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
  origin = typing.get_origin(ann)
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(ann)
    if value is None and type(None) in args:
      return None
    ann = next(a for a in args if a is not type(None))
  if ann is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if ann is float and isinstance(value, float) and not math.isfinite(value):
    raise ConfigError(f"config.{name}={value!r}: must be a finite number")
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
  _check_ranges(m, "model")
  _require(m.head_dim > 0 or m.d_model % m.num_heads == 0,
           f"config.model.d_model={m.d_model} is not divisible by num_heads={m.num_heads}; "
           "change one or set model.head_dim")
  _require(m.kv_heads <= m.num_heads and m.num_heads % m.kv_heads == 0,
           f"config.model.num_kv_heads={m.num_kv_heads}: must divide num_heads={m.num_heads}")
  _require(not (m.positions == "rope" and m.dim_per_head % 2),
           f"config.model.head_dim={m.dim_per_head}: RoPE needs an even head dim")
  _require(m.positions != "relative" or m.family == "encoder_decoder",  # only T5 reads it
           f"config.model.positions='relative' is T5's bias, which only family="
           f"encoder_decoder implements; for family={m.family!r} use rope, learned or alibi")
  _require(m.positions != "relative" or m.relative_max_distance > m.relative_buckets // 2,
           f"config.model.relative_max_distance={m.relative_max_distance}: must exceed "
           f"relative_buckets // 2 = {m.relative_buckets // 2} (the exactly-bucketed range)")
  e = m.moe
  if e.num_experts:
    _require(1 <= e.top_k <= e.num_experts,
             f"config.model.moe.top_k={e.top_k}: must be in [1, num_experts={e.num_experts}]")
    for name in ("num_layers", "num_decoder_layers"):
      depth = getattr(m, name)
      _require(not m.scan_layers or depth % e.every == 0,
               f"config.model.moe.every={e.every}: must divide model.{name}={depth} when "
               "scan_layers (the scan repeats groups of `every` layers)")
  p = m.peft
  try:
    re.compile(p.lora_targets)
  except re.error as e:
    raise ConfigError(f"config.model.peft.lora_targets={p.lora_targets!r}: not a regex ({e})")
  _require(p.method != "prefix" or m.family != "encoder",  # heads read virtual positions
           "config.model.peft.method='prefix' needs model.family='decoder' or "
           "'encoder_decoder' (got 'encoder': its heads read the virtual tokens' outputs); "
           "use method=prompt, lora or adapter for encoders")
  return m


def validate(cfg: Config) -> Config:
  validate_model(cfg.model)
  d, t = cfg.data, cfg.train
  for section in ("data", "train", "parallel", "align", "compress"):
    _check_ranges(getattr(cfg, section), section)
  _require(d.seq_len <= cfg.model.max_len or cfg.model.positions != "learned",
           f"config.data.seq_len={d.seq_len} exceeds config.model.max_len={cfg.model.max_len}; "
           "lower seq_len or raise max_len")
  _require(d.eval_split != d.train_split,
           f"config.data.eval_split={d.eval_split!r} is also config.data.train_split: "
           "evaluating on the training data hides overfitting; use a held-out split")
  _require(_is_codec(d.encoding), f"config.data.encoding={d.encoding!r}: not a text "
           "encoding Python knows (e.g. utf-8, latin-1, cp1252)")
  _require(d.mlm_mask_ratio + d.mlm_random_ratio <= 1.0,
           f"config.data.mlm_mask_ratio={d.mlm_mask_ratio} + mlm_random_ratio="
           f"{d.mlm_random_ratio}: must be <= 1 (the rest keep their token)")
  from llm.objectives import OBJECTIVES  # the registry imports this module
  _require(d.objective in OBJECTIVES,
           f"config.data.objective={d.objective!r}: must be one of {', '.join(sorted(OBJECTIVES))}")
  families = OBJECTIVES[d.objective].families
  _require(cfg.model.family in families,
           f"config.data.objective={d.objective!r} trains a {' or '.join(families)} model, "
           f"but config.model.family={cfg.model.family!r}; change one of them")
  if d.sources:
    from llm.data.source_mixture import check_sources  # the data package imports this module
    check_sources(d)
  _require(d.objective != "sft" or d.tasks,
           "config.data.tasks is empty: the sft objective needs tasks, e.g. "
           "--config.data.tasks=arithmetic or tfds:samsum or jsonl:/data/train.jsonl")
  try:
    re.compile(t.trainable)
  except re.error as e:
    raise ConfigError(f"config.train.trainable={t.trainable!r}: not a regex ({e})")
  _require(d.batch_size % t.microbatches == 0,
           f"config.train.microbatches={t.microbatches}: must divide "
           f"data.batch_size={d.batch_size}")
  sizes = {axis: getattr(cfg.parallel, axis) for axis in ("data", "fsdp", "tensor", "expert")}
  for axis, size in sizes.items():
    _require(size == -1 or size >= 1, f"config.parallel.{axis}={size}: must be -1 (the "
             "devices the other axes leave) or >= 1")
  named = " ".join(f"{axis}={size}" for axis, size in sizes.items())
  _require(list(sizes.values()).count(-1) <= 1,
           f"config.parallel {named}: only one axis may be -1; give the others sizes")
  validate_align(cfg.align, cfg.compress)
  return cfg


def _is_codec(name: str) -> bool:
  try:
    "a".encode(name)  # LookupError for unknown names and for bytes-to-bytes codecs
    return True
  except (LookupError, UnicodeError):
    return False


def check_sampling(cfg: Config) -> Config:
  """The end-of-training samples fit the context: checked by the entry points that sample,
  before training starts (a library run never samples)."""
  t = cfg.train
  _require(t.num_samples == 0 or t.sample_tokens < cfg.model.max_len,
           f"config.train.sample_tokens={t.sample_tokens}: a prompt plus the samples must fit "
           f"model.max_len={cfg.model.max_len}; lower it (or train.num_samples=0)")
  return cfg


def validate_align(a: AlignConfig, c: CompressConfig) -> None:
  """What RANGES cannot say about the align / compress sections."""
  _require(a.rollout_batch % a.ppo_minibatches == 0,
           f"config.align.ppo_minibatches={a.ppo_minibatches}: must divide "
           f"align.rollout_batch={a.rollout_batch}")


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
