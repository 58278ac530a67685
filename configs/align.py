"""Alignment and compression jobs, each starting from a trained workdir.

  python -m experiments.finetune --config configs/finetune.py:full \
      --config.data.tasks=review --config.train.init_from=runs/gpt_align --workdir runs/sft
  python -m experiments.reward_model --config configs/align.py:reward \
      --config.train.init_from=runs/sft --workdir runs/rm
  python -m experiments.dpo --config configs/align.py:dpo \
      --config.train.init_from=runs/sft --workdir runs/dpo
  python -m experiments.ppo --config configs/align.py:ppo --config.align.rater=runs/rm \
      --config.train.init_from=runs/sft --workdir runs/ppo
  python -m experiments.distill --config configs/align.py:distill \
      --config.compress.teacher=runs/gpt_align --workdir runs/student
  python -m experiments.prune --config configs/align.py:prune \
      --config.train.init_from=runs/gpt_align --workdir runs/prune

Variants: reward, dpo, ppo (KL coefficient 1.0; --config.align.kl_coef=0 removes it,
--config.align.kl_target=K makes it adaptive), distill, prune. The model fields below
only matter without train.init_from (distill: they are the student's).
"""

import ml_collections

from llm.config import default_configdict

# variant: (objective, steps, learning rate, batch size)
VARIANTS = {
    "reward": ("reward", 300, 1e-3, 32),
    "dpo": ("dpo", 100, 1e-4, 32),
    "ppo": ("ppo", 30, 3e-4, 64),
    "distill": ("distill", 300, 3e-3, 16),
    "prune": ("clm", 60, 1e-3, 16),
}
SIZES = tuple(VARIANTS)  # what `--config configs/align.py:VARIANT` accepts (--help lists it)


def get_config(variant: str = "reward") -> ml_collections.ConfigDict:
  variant = variant or "reward"
  if variant not in VARIANTS:
    raise ValueError(f"configs/align.py:{variant}: unknown variant; choose one of "
                     f"{', '.join(VARIANTS)}")
  objective, steps, learning_rate, batch_size = VARIANTS[variant]
  cfg = default_configdict()
  cfg.model.update(dict(family="decoder", vocab_size=1024, d_model=48, num_layers=2,
                        num_heads=4, d_ff=192, max_len=128))
  lm = variant in ("distill", "prune")
  cfg.data.update(dict(objective=objective, seq_len=64 if lm else 32, batch_size=batch_size))
  cfg.train.update(dict(steps=steps, learning_rate=learning_rate, warmup_steps=0 if variant ==
                        "ppo" else 20, weight_decay=0.0, log_every=10 if variant != "ppo" else 1,
                        eval_every=100, eval_batches=8, checkpoint_every=100, num_samples=0))
  if variant == "ppo":
    cfg.train.min_lr_ratio = 1.0  # a constant step size: the rollouts keep changing
    cfg.train.checkpoint_every = steps
    cfg.align.update(dict(rollout_batch=64, ppo_epochs=2, ppo_minibatches=2, kl_coef=1.0))
  return cfg
