"""Ablations of the tiny GPT (configs/gpt.py:tiny) on the embedded corpus.

  python -m experiments.sweep --config configs/sweeps/ablations.py:depth_width --workdir runs/dw
  python -m experiments.sweep --config configs/sweeps/ablations.py:lr --workdir runs/lr
  python -m experiments.sweep --config configs/sweeps/ablations.py:moe --workdir runs/moe
  python -m experiments.sweep --config configs/sweeps/ablations.py:all --workdir runs/abl

- depth_width: 1 to 16 layers at equal non-embedding params (12 L d^2 within 13%;
  head dim 16 throughout, d_ff = 4 d).
- lr: peak learning rate from 3e-4 to 3e-2 (warmup and cosine decay unchanged).
- moe: dense against MoE at equal active params per token: 4 experts top-1 with the dense
  d_ff, and 8 experts top-2 with half of it (each token uses 2 x d_ff / 2).
"""

import ml_collections

from configs import gpt
from llm.sweep import chain, sweep, zipit

STEPS = 300


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg  # every ablation trains the same base
  cfg = gpt.get_config("tiny")
  cfg.model.num_kv_heads = 0  # = num_heads, whatever the width
  cfg.train.update(dict(steps=STEPS, warmup_steps=30, log_every=10, eval_every=50,
                        checkpoint_every=100))
  return cfg


def depth_width() -> list[dict]:
  shapes = [(1, 128), (2, 96), (4, 64), (8, 48), (16, 32)]
  return zipit(sweep("model.num_layers", [layers for layers, _ in shapes]),
               sweep("model.d_model", [d for _, d in shapes]),
               sweep("model.num_heads", [d // 16 for _, d in shapes]),
               sweep("model.d_ff", [4 * d for _, d in shapes]))


def learning_rate() -> list[dict]:
  return sweep("train.learning_rate", [3e-4, 1e-3, 3e-3, 1e-2, 3e-2])


def moe() -> list[dict]:
  return [{"name": "dense", "model.d_ff": 512},
          {"name": "moe_4x_top1", "model.d_ff": 512, "model.moe.num_experts": 4,
           "model.moe.top_k": 1},
          {"name": "moe_8x_top2", "model.d_ff": 256, "model.moe.num_experts": 8,
           "model.moe.top_k": 2}]


SWEEPS = {"depth_width": depth_width, "lr": learning_rate, "moe": moe}


def get_sweep(arg: str = "") -> list[dict]:
  if arg == "all":
    return chain(*(make() for make in SWEEPS.values()))
  if arg not in SWEEPS:
    raise ValueError(f"configs/sweeps/ablations.py:{arg}: unknown ablation; choose one of "
                     f"{', '.join(SWEEPS)}, all")
  return SWEEPS[arg]()
