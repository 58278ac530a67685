"""Decoder-only language models (GPT-2, LLaMA) trained with causal LM.

  python -m experiments.pretrain_clm --config configs/gpt.py:tiny --workdir /tmp/gpt_tiny
  python -m experiments.pretrain_clm --config configs/gpt.py:llama --workdir /tmp/llama \
      --config.train.steps=2000 --config.data.source=text:/path/to/*.txt

Sizes: tiny (trains in minutes on a laptop CPU), small (tiny's recipe, bigger), gpt2
(GPT-2 124M: learned positions, LayerNorm, GELU, tied head), llama (a small LLaMA:
RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head).
"""

import ml_collections

from llm.config import default_configdict

_GPT2_STYLE = dict(positions="learned", norm="layernorm", norm_eps=1e-5, activation="gelu",
                   use_bias=True, tie_embeddings=True)
_LLAMA_STYLE = dict(positions="rope", norm="rmsnorm", norm_eps=1e-6, activation="swiglu",
                    use_bias=False, tie_embeddings=False, rope_theta=10000.0)

SIZES = {
    #        d_model layers heads kv_heads d_ff  vocab  max_len  style
    "tiny": (128, 4, 4, 4, 512, 4096, 256, _GPT2_STYLE),
    "small": (384, 6, 6, 6, 1536, 8192, 512, _GPT2_STYLE),
    "gpt2": (768, 12, 12, 12, 3072, 50257, 1024, _GPT2_STYLE),
    "llama": (512, 8, 8, 2, 1408, 8192, 1024, _LLAMA_STYLE),
}


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
  size = size or "tiny"
  if size not in SIZES:
    raise ValueError(f"configs/gpt.py:{size}: unknown size; choose one of {', '.join(SIZES)}")
  d_model, layers, heads, kv_heads, d_ff, vocab, max_len, style = SIZES[size]
  cfg = default_configdict()
  cfg.model.update(dict(family="decoder", vocab_size=vocab, d_model=d_model, num_layers=layers,
                        num_heads=heads, num_kv_heads=kv_heads, d_ff=d_ff, max_len=max_len,
                        **style))
  tiny = size == "tiny"
  cfg.data.update(dict(source="embedded", seq_len=min(max_len, 128 if tiny else 256),
                       batch_size=16 if tiny else 32))
  cfg.train.update(dict(steps=600 if tiny else 5000, learning_rate=3e-3 if tiny else 6e-4,
                        warmup_steps=40 if tiny else 500, log_every=20, eval_every=200,
                        eval_batches=8, checkpoint_every=200))
  return cfg
