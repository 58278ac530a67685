"""Mixture-of-experts decoders trained with causal LM.

  python -m experiments.pretrain_clm --config configs/moe.py:tiny --workdir /tmp/moe_tiny

Sizes: tiny (4 experts, top-2, every layer; trains in minutes on a laptop CPU) and
mixtral (Mixtral-8x7B-shaped: 32 layers, d_model 4096, 8 experts, top-2, GQA 32/8).
"""

import ml_collections

from configs import gpt

SIZES = {
    #          d_model layers heads kv d_ff vocab max_len experts top_k capacity
    "tiny": (128, 4, 4, 4, 256, 4096, 256, 4, 2, 1.25),
    "mixtral": (4096, 32, 32, 8, 14336, 32000, 32768, 8, 2, 2.0),
}


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
  size = size or "tiny"
  if size not in SIZES:
    raise ValueError(f"configs/moe.py:{size}: unknown size; choose one of {', '.join(SIZES)}")
  d_model, layers, heads, kv, d_ff, vocab, max_len, experts, top_k, capacity = SIZES[size]
  cfg = gpt.get_config("tiny" if size == "tiny" else "llama")
  cfg.model.update(dict(d_model=d_model, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                        d_ff=d_ff, vocab_size=vocab, max_len=max_len))
  if size == "mixtral":
    cfg.model.update(dict(rope_theta=1e6, norm_eps=1e-5))
  cfg.model.moe.update(dict(num_experts=experts, top_k=top_k, every=1,
                            capacity_factor=capacity, aux_loss_weight=0.01,
                            z_loss_weight=0.001, renormalize=True))
  return cfg
