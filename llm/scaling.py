"""What a model costs: parameters, FLOPs, memory per device, compute budgets, time.

Pure arithmetic on a config (no devices, no allocation), used for MFU, for the planner
(`experiments/plan.py`) and for sweeps. Memory per device follows the sharding rules of
`llm.parallel` exactly for params / gradients / optimizer state (it shards the abstract
param tree by their logical names) and estimates activations from the tensors the
backward pass keeps (`activation_bytes`), checked against the compiler's memory
analysis in `benchmarks/will_it_fit.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from llm.config import ModelConfig

PF_DAY = 1e15 * 86400  # FLOPs in one petaflop/s-day


# ----------------------------------------------------------------------------- parameters


def _layer_counts(cfg: ModelConfig) -> tuple[int, int, int]:
  """(encoder-side or decoder-only layers, enc-dec decoder layers, MoE layers in all)."""
  first = cfg.num_layers
  second = (cfg.num_decoder_layers or cfg.num_layers) if cfg.family == "encoder_decoder" else 0
  moe = 0
  if cfg.moe.num_experts:
    moe = sum(sum((i + 1) % cfg.moe.every == 0 for i in range(n)) for n in (first, second))
  return first, second, moe


def param_count(cfg: ModelConfig, include_embeddings: bool = True, active: bool = False) -> int:
  """Weights (biases and norms left out). `active`: only those one token uses, i.e. top_k
  of the experts in MoE layers (what sets FLOPs per token). An encoder-decoder counts
  both stacks and the decoder's cross-attention."""
  d, f, n, k, h = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
  attn = d * n * h * 2 + d * k * h * 2
  mlp = d * f * (3 if cfg.activation in ("swiglu", "geglu") else 2)
  experts = cfg.moe.num_experts
  first, second, moe_layers = _layer_counts(cfg)
  moe_mlp = d * experts + mlp * (min(cfg.moe.top_k, experts) if active else experts)
  total = (first + second) * (attn + mlp) + second * attn + moe_layers * (moe_mlp - mlp)
  if include_embeddings:
    total += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    total += cfg.max_len * d if cfg.positions == "learned" else 0
  return total


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that take part in a matmul per token: blocks plus the LM head."""
  return param_count(cfg, include_embeddings=False, active=True) + cfg.vocab_size * cfg.d_model


def _attention_flops(cfg: ModelConfig, seq_len: int, train: bool) -> float:
  """QK^T and PV per token: 4 * T * N*H FLOPs per attention layer forward over all T keys.

  Training counts forward + backward (x3) and, for causal self-attention, half the score
  matrix (as the PaLM paper's MFU does); bidirectional and cross-attention count all of
  it. The forward count is per token decoded at a context of `seq_len` (all keys).
  An encoder-decoder has encoder self-, decoder self- and cross-attention per token.
  """
  full = 4 * seq_len * cfg.num_heads * cfg.dim_per_head
  first, second, _ = _layer_counts(cfg)
  if not train:
    return full * (first + 2 * second)
  causal, bidirectional = 3 * full / 2, 3 * full
  if cfg.family == "decoder":
    return first * causal
  return first * bidirectional + second * (causal + bidirectional)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """6 N (forward + backward matmuls) plus attention scores and mixing.

  For a decoder the attention term is 6 * L * T * N*H (QK^T and PV, forward and
  backward, half the causal score matrix unused). For an encoder-decoder a "token" is one
  encoder and one decoder position (both `seq_len`).
  """
  return 6 * matmul_params(cfg) + _attention_flops(cfg, seq_len, train=True)


def forward_flops_per_token(cfg: ModelConfig, context_len: int) -> float:
  return 2 * matmul_params(cfg) + _attention_flops(cfg, context_len, train=False)


def exact_param_count(cfg: ModelConfig) -> int:
  """Every parameter the model's init creates (biases, norms, heads included; PEFT
  params not), equal to the size of `jax.eval_shape(module.init, ...)` (tested)."""
  d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  nh, kh = cfg.num_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
  b = 1 if cfg.use_bias else 0
  norm = d * (2 if cfg.norm == "layernorm" and cfg.use_bias else 1)
  attn = d * (nh + 2 * kh) + nh * d + b * (nh + 2 * kh + d)
  mlp = d * f * (3 if cfg.activation in ("swiglu", "geglu") else 2) + b * (
      f * (2 if cfg.activation in ("swiglu", "geglu") else 1) + d)
  moe = d * cfg.moe.num_experts + cfg.moe.num_experts * mlp
  first, second, moe_layers = _layer_counts(cfg)
  block = attn + 2 * norm + mlp
  total = (first + second) * block + second * (attn + norm) + moe_layers * (moe - mlp)
  offset = 0 if cfg.family == "decoder" else cfg.position_offset  # RoBERTa / BART rows
  positions = (cfg.max_len + offset) * d if cfg.positions == "learned" else 0
  stacks = 2 if cfg.family == "encoder_decoder" else 1
  total += v * d + (0 if cfg.tie_embeddings or cfg.family == "encoder" else v * d)
  total += stacks * (positions + (norm if cfg.embed_norm else 0)
                     + (0 if cfg.post_norm and cfg.family != "decoder" else norm))
  if cfg.positions == "relative":
    total += stacks * cfg.relative_buckets * cfg.num_heads
  if cfg.family == "encoder":  # token types; MLM head (dense, norm, bias); pooler
    total += cfg.type_vocab_size * d + (d * d + d + norm + v) + (d * d + d)
  return total


# ----------------------------------------------------------------------------- memory


def _bytes(dtype: str) -> int:
  return np.dtype(dtype).itemsize


@functools.lru_cache(maxsize=8)
def _abstract_params(cfg):
  """The boxed param tree's shapes and logical names (traced, not allocated)."""
  import jax

  from llm import models, objectives
  from llm.train.state import init_params
  module = models.build(cfg.model)
  example = objectives.get(cfg.data.objective).example_batch(cfg, 1)
  return jax.eval_shape(lambda: init_params(module, example, 0, boxed=True))


def sharded_param_elements(cfg, mesh_axes: dict) -> dict:
  """Elements of the train state's params held by one device, split as
  {"all": every param, "experts": those of MoE experts}, for a mesh of `mesh_axes`
  sizes, by the same rules `llm.parallel` shards with (`cfg` is a full `Config`)."""
  import flax.linen as nn
  import jax

  from llm import parallel
  boxed = _abstract_params(cfg)
  mesh = parallel.abstract_mesh(mesh_axes)
  totals = {"all": 0, "experts": 0}

  def one(path, leaf):
    if isinstance(leaf, nn.Partitioned):
      spec = parallel.logical_to_spec(leaf.names, leaf.value.shape, mesh)
      size = leaf.value.size
      for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
          size //= mesh_axes[axis]
      expert = "expert" in leaf.names
    else:
      size, expert = leaf.size, False
    totals["all"] += size
    totals["experts"] += size if expert else 0
  jax.tree_util.tree_map_with_path(one, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return totals


def activation_bytes(cfg: ModelConfig, tokens: int, seq_len: int, tensor: int = 1,
                     remat: str | None = None) -> dict:
  """Bytes of activations at the peak of a train step (the start of the backward pass)
  for `tokens` tokens on one device, rows of `seq_len`.

  Per layer we count what the backward pass reads, in the compute dtype: both sides of
  each norm, q / k / v and the attention output, the float32 attention logits and the
  probabilities (no flash attention: the T x T scores are stored), the MLP's inputs and
  hidden units; for MoE layers the (token, expert, slot) dispatch and combine tensors
  and the experts' slots. remat "full" keeps only each block's input plus one block
  recomputed at a time; "dots" keeps the batch-free matmul outputs (the policy in
  `llm.models.blocks`). The head: float32 logits, their log-softmax and gradient.
  """
  remat = cfg.remat if remat is None else remat
  e, t = _bytes(cfg.dtype), tensor
  d, f, n = cfg.d_model, cfg.d_ff, cfg.num_heads
  nh, kh = n * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
  gated = cfg.activation in ("swiglu", "geglu")
  scores = n * seq_len * (4 + e) / t + seq_len  # logits f32, probs, the bool mask
  attn = e * (2 * d + (2 * nh + 2 * kh) / t) + scores
  mlp = e * (2 * d + (3 if gated else 2) * f / t)
  dense_block = attn + mlp
  if cfg.moe.num_experts:
    from llm.layers.moe import expert_capacity
    experts = cfg.moe.num_experts
    slots = experts * expert_capacity(seq_len, experts, cfg.moe.top_k, cfg.moe.capacity_factor)
    # per token: dispatch (bool, cast to e) and combine (f32) rows of E x C; its share
    # slots / T of the experts' input, hidden units and output
    moe = (slots * (1 + e + 4) + experts * 8
           + e * (2 * d + slots / seq_len * (2 * d + (3 if gated else 2) * f / t)))
  first, second, moe_layers = _layer_counts(cfg)
  cross = attn + e * 2 * d  # enc-dec: cross-attention (+ its norm) per decoder block
  layers = first + second
  per_layer_full = [dense_block] * (layers - moe_layers) + (
      [attn + moe] * moe_layers if moe_layers else [])
  full = sum(per_layer_full) + second * cross
  kept = {
      "none": full,
      "full": layers * e * d + max(per_layer_full) + (cross if second else 0),
      "dots": layers * e * (3 * d + (nh + 2 * kh + (2 if gated else 1) * f) / t)
              + max(per_layer_full) + (cross if second else 0),
  }[remat]
  head = cfg.vocab_size * (3 * 4 + e) / t + 2 * e * d
  return {"layers": tokens * kept, "head": tokens * head,
          "total": tokens * (kept + head)}


def _mesh_sizes(pcfg) -> dict:
  return {a: getattr(pcfg, a) for a in ("data", "fsdp", "tensor", "expert")}


def train_memory(cfg, pcfg, global_batch: int | None = None, remat: str | None = None) -> dict:
  """Bytes per device of a train step on a mesh `pcfg` (a ParallelConfig with every axis
  resolved): params, gradients and AdamW's two moments (sharded as `llm.parallel` does,
  in param dtype), FSDP's gathered copy of one layer's weights (forward and backward),
  and activations (`activation_bytes`). `cfg` is a full Config; the batch defaults to
  cfg.data.batch_size, micro-batched by cfg.train.microbatches (which adds a gradient
  accumulator)."""
  sizes = _mesh_sizes(pcfg)
  batch = global_batch or cfg.data.batch_size
  m, p = cfg.model, _bytes(cfg.model.param_dtype)
  elements = sharded_param_elements(cfg, sizes)["all"]
  rows = batch / cfg.train.microbatches / (sizes["data"] * sizes["fsdp"] * sizes["expert"])
  act = activation_bytes(m, rows * cfg.data.seq_len, cfg.data.seq_len, sizes["tensor"], remat)
  first, second, moe_layers = _layer_counts(m)
  gated = m.activation in ("swiglu", "geglu")
  expert_weights = moe_layers * m.moe.num_experts * m.d_model * m.d_ff * (3 if gated else 2)
  dense_weights = param_count(m, include_embeddings=False) - expert_weights
  per_layer = (dense_weights / (first + second)
               + expert_weights / max(moe_layers, 1) / sizes["expert"]) / sizes["tensor"]
  gathered = 2 * per_layer * _bytes(m.dtype) if sizes["fsdp"] > 1 else 0
  out = {"params": elements * p, "gradients": elements * p * (
      2 if cfg.train.microbatches > 1 else 1), "optimizer": 2 * elements * p,
         "fsdp_gather": gathered, "activations": act["total"]}
  out["total"] = sum(out.values())
  return out


def inference_memory(cfg: ModelConfig, pcfg, batch: int, context_len: int,
                     dtype: str = "bfloat16") -> dict:
  """Bytes per device to serve: weights in `dtype` sharded over fsdp x tensor (experts
  also over expert), the KV cache for `batch` rows of `context_len` (rows over data x
  fsdp x expert, kv heads over tensor when they divide), and the prefill's float32
  logits."""
  sizes = _mesh_sizes(pcfg)
  e = _bytes(dtype)
  params = exact_param_count(cfg) * e / (sizes["fsdp"] * sizes["tensor"])
  rows = batch / (sizes["data"] * sizes["fsdp"] * sizes["expert"])
  kv_split = sizes["tensor"] if cfg.kv_heads % sizes["tensor"] == 0 else 1
  layers = cfg.num_decoder_layers or cfg.num_layers
  kv = rows * context_len * layers * 2 * cfg.kv_heads * cfg.dim_per_head * e / kv_split
  logits = rows * context_len * cfg.vocab_size * 4 / sizes["tensor"]
  return {"params": params, "kv_cache": kv, "logits": logits, "total": params + kv + logits}


# ----------------------------------------------------------------------------- budgets


def pf_days(flops: float) -> float:
  return flops / PF_DAY


def chinchilla_tokens(params: float) -> float:
  """Compute-optimal tokens for a model size: about 20 per parameter (Hoffmann et al.
  2022, Table 3)."""
  return 20.0 * params


# Hoffmann et al. 2022, eq. 10 (approach 3): L(N, D) = E + A / N^alpha + B / D^beta.
HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def hoffmann_loss(params: float, tokens: float) -> float:
  h = HOFFMANN
  return h["E"] + h["A"] / params ** h["alpha"] + h["B"] / tokens ** h["beta"]


def _fit_exponents():
  h = HOFFMANN
  s = h["alpha"] + h["beta"]
  return h["beta"] / s, h["alpha"] / s, (h["alpha"] * h["A"] / (h["beta"] * h["B"])) ** (1 / s)


def optimal_tokens(params: float) -> dict:
  """Tokens that make a model of `params` compute-optimal: the 20x rule, and the
  Hoffmann fit's (inverting N_opt(C) = G (C/6)^a for C, then D = C / 6N)."""
  a, _, g = _fit_exponents()
  return {"rule": chinchilla_tokens(params), "fit": (params / g) ** (1 / a) / params}


def chinchilla_optimal(flops: float) -> dict:
  """Compute-optimal (params, tokens) for a budget of C = 6 N D FLOPs, two ways:
  `rule` (D = 20 N, so N = sqrt(C / 120)) and `fit`, the minimum of the Hoffmann
  parametric loss: N = G (C/6)^(beta/(alpha+beta)), D = (C/6)^(alpha/(alpha+beta)) / G,
  G = (alpha A / (beta B))^(1/(alpha+beta))."""
  n_rule = math.sqrt(flops / 120.0)
  a, b, g = _fit_exponents()
  n_fit = g * (flops / 6.0) ** a
  d_fit = (flops / 6.0) ** b / g
  return {"rule": {"params": n_rule, "tokens": 20.0 * n_rule},
          "fit": {"params": n_fit, "tokens": d_fit, "loss": hoffmann_loss(n_fit, d_fit)}}


# ----------------------------------------------------------------------------- hardware


@dataclasses.dataclass(frozen=True)
class Chip:
  peak_flops: float  # dense bf16 FLOP/s per chip
  memory: float  # bytes of HBM per chip
  per_host: int  # chips per host / node: where a tensor-parallel group stays


GB, GIB = 1e9, 2.0 ** 30
CHIPS = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOPs (bf16), 32 GiB HBM2; 4 chips per host
    "v4": Chip(275e12, 32 * GIB, 4),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOPs (bf16), 16 GB HBM2; 8 chips per host
    "v5e": Chip(197e12, 16 * GB, 8),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOPs (bf16), 95 GB HBM2e; 4 chips per host
    "v5p": Chip(459e12, 95 * GB, 4),
    # cloud.google.com/tpu/docs/v6e (Trillium): 918 TFLOPs (bf16), 32 GB; 8 per host
    "v6e": Chip(918e12, 32 * GB, 8),
    # NVIDIA A100 datasheet (SXM 80GB): 312 TFLOPS bf16 dense (624 is with sparsity)
    "a100": Chip(312e12, 80 * GB, 8),
    # NVIDIA H100 datasheet (SXM): 989 TFLOPS bf16 dense (1979 is with sparsity), 80 GB
    "h100": Chip(989e12, 80 * GB, 8),
    # NVIDIA H200 datasheet (SXM): same compute as H100, 141 GB HBM3e
    "h200": Chip(989e12, 141 * GB, 8),
}


def chip(name: str) -> Chip:
  if name.lower() not in CHIPS:
    raise ValueError(f"--chip={name!r}: unknown chip; choose one of {', '.join(CHIPS)}")
  return CHIPS[name.lower()]


def step_seconds(flops_per_token: float, tokens_per_step: float, chips: int, hw: Chip,
                 mfu: float) -> float:
  """Time of one step if the chips sustain `mfu` of their peak."""
  return flops_per_token * tokens_per_step / (chips * hw.peak_flops * mfu)


def train_days(flops_per_token: float, tokens: float, chips: int, hw: Chip,
               mfu: float) -> float:
  return step_seconds(flops_per_token, tokens, chips, hw, mfu) / 86400
