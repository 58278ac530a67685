"""Encoder-only models (BERT, RoBERTa) trained with masked LM.

  python -m experiments.pretrain_mlm --config configs/bert.py:tiny --workdir /tmp/bert_tiny

Sizes: tiny (minutes on a laptop CPU), base (BERT-base: 12 x 768, 110M params),
roberta (RoBERTa-style base: no token types, positions offset by 2, whole-word masks off,
larger batches in the paper).
"""

import ml_collections

from llm.config import default_configdict

_BERT = dict(post_norm=True, embed_norm=True, norm="layernorm", norm_eps=1e-12,
             activation="gelu_exact", use_bias=True, tie_embeddings=True, positions="learned")

SIZES = {
    #          d_model layers heads d_ff  vocab  max_len  extra
    "tiny": (128, 4, 4, 512, 4096, 128, dict(type_vocab_size=2)),
    "base": (768, 12, 12, 3072, 30522, 512, dict(type_vocab_size=2)),
    "roberta": (768, 12, 12, 3072, 50265, 512, dict(type_vocab_size=1, position_offset=2)),
}


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
  size = size or "tiny"
  if size not in SIZES:
    raise ValueError(f"configs/bert.py:{size}: unknown size; choose one of {', '.join(SIZES)}")
  d_model, layers, heads, d_ff, vocab, max_len, extra = SIZES[size]
  cfg = default_configdict()
  cfg.model.update(dict(family="encoder", vocab_size=vocab, d_model=d_model, num_layers=layers,
                        num_heads=heads, d_ff=d_ff, max_len=max_len, **_BERT, **extra))
  tiny = size == "tiny"
  cfg.data.update(dict(objective="mlm", seq_len=128, batch_size=16 if tiny else 256,
                       mlm_probability=0.15))
  cfg.train.update(dict(steps=600 if tiny else 100_000, learning_rate=1e-3 if tiny else 1e-4,
                        warmup_steps=40 if tiny else 10_000, weight_decay=0.01, b2=0.999,
                        log_every=20, eval_every=200, checkpoint_every=200))
  return cfg
