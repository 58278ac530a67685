"""FLOPs per token, used for MFU (more of the compute-budget calculators land here)."""

from llm.config import ModelConfig


def param_count(cfg: ModelConfig, include_embeddings: bool = True, active: bool = False) -> int:
  """Weights (biases and norms left out). `active`: only those one token uses, i.e. top_k
  of the experts in MoE layers (what sets FLOPs per token)."""
  d, f, n, k, h = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
  attn = d * n * h * 2 + d * k * h * 2
  mlp = d * f * (3 if cfg.activation in ("swiglu", "geglu") else 2)
  experts = cfg.moe.num_experts
  moe_mlp = d * experts + mlp * (min(cfg.moe.top_k, experts) if active else experts)

  def stack(layers: int, attention: int) -> int:
    moe_layers = sum((i + 1) % cfg.moe.every == 0 for i in range(layers)) if experts else 0
    return layers * (attention + mlp) + moe_layers * (moe_mlp - mlp)
  total = stack(cfg.num_layers, attn)
  stacks = 1
  if cfg.family == "encoder_decoder":  # the decoder: self- and cross-attention per layer
    total += stack(cfg.num_decoder_layers or cfg.num_layers, 2 * attn)
    stacks = 2
  if cfg.family == "encoder":
    total += 2 * d * d  # the MLM head's transform and the pooler
  if include_embeddings:
    total += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    if cfg.positions == "learned":  # a table per stack, position_offset rows in front
      total += stacks * (cfg.max_len + cfg.position_offset) * d
    total += cfg.type_vocab_size * d
  return total


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that take part in a matmul per token: blocks plus the LM head."""
  return param_count(cfg, include_embeddings=False, active=True) + cfg.vocab_size * cfg.d_model


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """6 N (forward + backward matmuls) plus causal attention scores and mixing.

  The attention term is 6 * L * T * N*H (QK^T and PV, forward and backward), halved
  because a causal mask leaves half the score matrix unused (as in the PaLM paper's MFU).
  """
  attn = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.dim_per_head
  return 6 * matmul_params(cfg) + attn


def forward_flops_per_token(cfg: ModelConfig, context_len: int) -> float:
  attn = 4 * cfg.num_layers * context_len * cfg.num_heads * cfg.dim_per_head
  return 2 * matmul_params(cfg) + attn
