"""Compute-optimal scaling (Hoffmann et al. 2022, "Chinchilla", approach 2): IsoFLOP curves.

  python -m experiments.sweep --config configs/sweeps/isoflop.py --workdir runs/isoflop
  python -m experiments.sweep --config configs/sweeps/isoflop.py:quick --workdir runs/iso_q

For each compute budget C, six GPT decoders from a size ladder are each trained on
D = C / (6 N) tokens (N = all weights, embeddings included), with the cosine schedule
ending at that run's last step. The six sizes are the ladder's window whose centre is
nearest Chinchilla's D = 20 N prediction, N = sqrt(C / 120). The report fits loss
against log N per budget, marks the optimum and fits N*(C), D*(C) as power laws.

Budgets 3e11, 1e12, 3e12 FLOPs fit a 2-core CPU: about 30-40 minutes idle (`quick`:
budgets / 10, a few minutes, for checking the pipeline). The embedded corpus has about
0.67M training tokens at this vocabulary, so the smallest models of the largest budget
see it several times (the report's tokens column says how often).
"""

import math

import ml_collections

from configs import gpt
from llm import config as config_lib, scaling
from llm.sweep import isoflop

BUDGETS = {"": (3e11, 1e12, 3e12), "quick": (3e10, 1e11, 3e11)}
SIZES_PER_BUDGET = 6
VOCAB, SEQ_LEN, BATCH = 1024, 64, 32
LADDER = (  # (d_model, num_layers, num_heads): about 1.4x more weights per rung
    (16, 1, 1), (24, 1, 1), (32, 1, 1), (32, 2, 1), (40, 2, 2), (48, 2, 3), (64, 2, 2),
    (64, 3, 2), (80, 3, 5), (96, 3, 3), (128, 3, 4))


def _budgets(arg: str):
  if arg not in BUDGETS:
    raise ValueError(f"configs/sweeps/isoflop.py:{arg}: unknown arg; choose one of "
                     f"{', '.join(repr(k) for k in BUDGETS)}")
  return BUDGETS[arg]


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  _budgets(arg or "")
  cfg = gpt.get_config("tiny")
  cfg.model.update(dict(vocab_size=VOCAB, max_len=SEQ_LEN))
  cfg.data.update(dict(seq_len=SEQ_LEN, batch_size=BATCH))
  cfg.train.update(dict(learning_rate=3e-3, eval_batches=0))  # all validation
  return cfg


def _model(d_model: int, num_layers: int, num_heads: int) -> dict:
  return {"model.d_model": d_model, "model.num_layers": num_layers,
          "model.num_heads": num_heads, "model.num_kv_heads": 0, "model.d_ff": 4 * d_model}


def _params(base, model: dict) -> int:
  fields = {**base.model.to_dict(), **{k.split(".", 1)[1]: v for k, v in model.items()}}
  return scaling.param_count(config_lib.model_from_dict(fields))


def get_sweep(arg: str = "") -> list[dict]:
  base = get_config(arg)
  ladder = [(_model(*rung), _params(base, _model(*rung))) for rung in LADDER]
  trials = []
  for budget in _budgets(arg or ""):
    predicted = math.sqrt(budget / (6 * isoflop.CHINCHILLA_TOKENS_PER_PARAM))
    starts = range(len(ladder) - SIZES_PER_BUDGET + 1)
    start = min(starts, key=lambda s: abs(sum(
        math.log(n / predicted) for _, n in ladder[s:s + SIZES_PER_BUDGET])))
    for model, params in ladder[start:start + SIZES_PER_BUDGET]:
      steps = isoflop.steps_for_budget(budget, params, BATCH * SEQ_LEN)
      trials.append({
          "name": f"C{budget:.0e}_N{params // 1000}k_d{model['model.d_model']}"
                  f"L{model['model.num_layers']}",
          "tag.budget": budget, **model, "train.steps": steps,
          "train.warmup_steps": min(40, steps // 10), "train.log_every": max(1, steps // 50),
          "train.eval_every": max(1, steps // 4), "train.checkpoint_every": max(1, steps // 4)})
  return trials
