"""The data studies of experiments/data_study.py: the tiny GPT, a few hundred steps.

  python -m experiments.data_study --study curation --out runs/study
  python -m experiments.data_study --study domain --out runs/study \
      --config.train.steps=150 --continue_steps=100

Variants: `pretrain` (raw vs curated runs, and the general model of the domain study)
and `continue` (continued pretraining from it: a lower peak learning rate, a short warmup).
"""

import ml_collections

from configs import gpt


SIZES = ("pretrain", "continue")


def get_config(variant: str = "pretrain") -> ml_collections.ConfigDict:
  variant = variant or "pretrain"
  if variant not in SIZES:
    raise ValueError(f"configs/data_study.py:{variant}: unknown variant; choose pretrain or "
                     "continue")
  cfg = gpt.get_config("tiny")
  steps = 300 if variant == "pretrain" else 150
  # Evaluation and checkpoints only at the end: the studies score on their own text.
  cfg.train.update(dict(steps=steps, log_every=50, eval_every=steps, eval_batches=4,
                        checkpoint_every=steps, num_samples=0))
  if variant == "continue":
    cfg.train.update(dict(learning_rate=1e-3, warmup_steps=10))
  return cfg
