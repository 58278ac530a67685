"""Reward hacking, measured: PPO runs with different KL coefficients side by side (the
reward model's score, the hidden rule's true score, the KL to the reference and the
reference's perplexity of the samples, per rollout), and a table of where each ended."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

CURVES = (("reward", "reward-model score"), ("true_score", "true score (hidden rule)"),
          ("kl", "KL(policy || reference) per response"),
          ("ref_perplexity", "reference perplexity of samples"))


def _mean(records: Sequence[dict], key: str, last: int) -> float:
  values = [r[key] for r in records[-last:]]
  return sum(values) / len(values)


def hacking_table(runs: Mapping[str, Sequence[dict]], held_out: Mapping[str, dict],
                  last: int = 5) -> str:
  """One row per run: the first rollout's and the mean of the last `last` rollouts'
  reward, true score, KL and reference perplexity, then held-out ratings."""
  header = ["run", "reward (start -> end)", "true score (start -> end)", "KL / response",
            "ref. perplexity", "held-out reward", "held-out true score"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, records in runs.items():
    first = records[0]
    cells = [name] + [f"{first[k]:.2f} -> {_mean(records, k, last):.2f}"
                      for k in ("reward", "true_score")]
    cells += [f"{_mean(records, 'kl', last):.2f}", f"{_mean(records, 'ref_perplexity', last):.1f}"]
    rating = held_out.get(name, {})
    cells += [f"{rating[k]:.2f}" if k in rating else "-" for k in ("reward", "true_score")]
    lines.append("| " + " | ".join(cells) + " |")
  for name, rating in held_out.items():
    if name not in runs:
      lines.append(f"| {name} | - | - | - | - | {rating['reward']:.2f} | "
                   f"{rating['true_score']:.2f} |")
  return "\n".join(lines)


def plot_hacking(runs: Mapping[str, Sequence[dict]], path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.4))
  for ax, (key, title) in zip(axes, CURVES):
    for name, records in runs.items():
      ax.plot([r["step"] for r in records], [r[key] for r in records], label=name)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("rollout")
    ax.grid(alpha=0.3)
    if key == "ref_perplexity":
      ax.set_yscale("log")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
