"""Encoder-decoder models (T5 v1.1 style) trained with span corruption.

  python -m experiments.pretrain_t5 --config configs/t5.py:tiny --workdir /tmp/t5_tiny

Sizes: tiny (minutes on a laptop CPU) and small (T5-small: 6 + 6 layers, d_model 512,
8 heads, d_ff 2048, vocab 32128, tied head, ReLU; 60.5M params as published).
`--config.model.activation=geglu --config.model.tie_embeddings=False` gives T5 v1.1.
"""

import ml_collections

from llm.config import default_configdict

_T5 = dict(family="encoder_decoder", positions="relative", norm="rmsnorm", norm_eps=1e-6,
           use_bias=False, scale_attention=False, relative_buckets=32,
           relative_max_distance=128, init_std=0.05)

SIZES = {
    #        d_model layers heads d_ff vocab max_len activation tied
    "tiny": (128, 3, 4, 512, 4096, 512, "geglu", False),
    "small": (512, 6, 8, 2048, 32128, 512, "relu", True),
}


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
  size = size or "tiny"
  if size not in SIZES:
    raise ValueError(f"configs/t5.py:{size}: unknown size; choose one of {', '.join(SIZES)}")
  d_model, layers, heads, d_ff, vocab, max_len, activation, tied = SIZES[size]
  cfg = default_configdict()
  cfg.model.update(dict(d_model=d_model, num_layers=layers, num_decoder_layers=layers,
                        num_heads=heads, d_ff=d_ff, vocab_size=vocab, max_len=max_len,
                        activation=activation, tie_embeddings=tied, **_T5))
  tiny = size == "tiny"
  cfg.data.update(dict(objective="span", seq_len=128, batch_size=16 if tiny else 128,
                       noise_density=0.15, mean_span_length=3.0))
  cfg.train.update(dict(steps=600 if tiny else 100_000, learning_rate=3e-3 if tiny else 1e-3,
                        warmup_steps=40 if tiny else 10_000, weight_decay=0.0,
                        log_every=20, eval_every=200, checkpoint_every=200))
  return cfg
