"""Compute-optimal scaling from an IsoFLOP sweep (Hoffmann et al. 2022, approach 2).

For each compute budget C, models of several sizes N are trained on D = C / (6 N)
tokens; final loss against log N is fitted by a parabola whose vertex is that budget's
loss-optimal size N*(C). Fitting N* and D* = C / (6 N*) as power laws of C gives the
compute-optimal allocation; Chinchilla found N* ~ C^0.5 and about 20 tokens per param.
N counts every weight (embeddings included), as Chinchilla does.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

CHINCHILLA_TOKENS_PER_PARAM = 20.0


def tokens_for_budget(budget: float, params: int) -> float:
  return budget / (6.0 * params)


def steps_for_budget(budget: float, params: int, tokens_per_step: int) -> int:
  """Train steps whose tokens make 6 * params * tokens = budget (at least 1)."""
  return max(1, round(tokens_for_budget(budget, params) / tokens_per_step))


def fit_budget(params: Sequence[float], losses: Sequence[float]) -> dict:
  """loss = a (ln N)^2 + b ln N + c; the vertex is the optimum when a > 0. `bracketed`
  says whether it lies inside the sizes tried (else it is an extrapolation)."""
  x, y = np.log(np.asarray(params, float)), np.asarray(losses, float)
  if len(x) < 3:
    raise ValueError(f"an IsoFLOP budget needs >= 3 finished sizes to fit a parabola, got {len(x)}")
  a, b, c = np.polyfit(x, y, 2)
  out = {"coefficients": [float(a), float(b), float(c)], "bracketed": False,
         "params_opt": None, "loss_opt": None}
  if a > 0:
    vertex = -b / (2 * a)
    out.update(params_opt=float(math.exp(vertex)), loss_opt=float(c - b * b / (4 * a)),
               bracketed=bool(x.min() <= vertex <= x.max()))
  return out


def power_law(xs: Sequence[float], ys: Sequence[float]) -> dict:
  """y = coefficient * x^exponent, least squares in log-log."""
  exponent, log_coefficient = np.polyfit(np.log(xs), np.log(ys), 1)
  return {"exponent": float(exponent), "coefficient": float(math.exp(log_coefficient))}


def analyze(points: Sequence[dict]) -> dict:
  """points: {budget, params, loss} per finished trial -> per-budget optima and the power
  laws N*(C), D*(C) (when >= 2 budgets have an optimum)."""
  budgets: dict[float, list[dict]] = {}
  for p in points:
    budgets.setdefault(float(p["budget"]), []).append(p)
  per_budget = []
  for budget in sorted(budgets):
    group = sorted(budgets[budget], key=lambda p: p["params"])
    if len(group) < 3:
      continue
    fit = fit_budget([p["params"] for p in group], [p["loss"] for p in group])
    best = min(group, key=lambda p: p["loss"])
    row = {"budget": budget, "sizes": len(group), "best_trial_params": best["params"],
           "best_trial_loss": best["loss"], **fit}
    if fit["params_opt"] is not None:
      row["tokens_opt"] = tokens_for_budget(budget, fit["params_opt"])
      row["tokens_per_param"] = row["tokens_opt"] / fit["params_opt"]
    per_budget.append(row)
  out: dict = {"budgets": per_budget}
  optima = [r for r in per_budget if r["params_opt"] is not None]
  if len(optima) >= 2:
    c = [r["budget"] for r in optima]
    out["params_law"] = power_law(c, [r["params_opt"] for r in optima])
    out["tokens_law"] = power_law(c, [r["tokens_opt"] for r in optima])
    out["tokens_per_param_geomean"] = float(np.exp(np.mean(
        [np.log(r["tokens_per_param"]) for r in optima])))
  return out


def markdown(analysis: dict) -> str:
  lines = ["## IsoFLOP fit (compute-optimal size per budget)", "",
           "| budget (FLOPs) | sizes | optimal params N* | tokens D* = C/6N* | D*/N* | loss at N* "
           "| inside sizes tried |", "|---|---|---|---|---|---|---|"]
  for r in analysis["budgets"]:
    if r["params_opt"] is None:
      lines.append(f"| {r['budget']:.3g} | {r['sizes']} | no minimum (parabola opens down) "
                   "| | | | |")
      continue
    lines.append(f"| {r['budget']:.3g} | {r['sizes']} | {r['params_opt']:,.0f} | "
                 f"{r['tokens_opt']:,.0f} | {r['tokens_per_param']:.1f} | {r['loss_opt']:.4f} | "
                 f"{'yes' if r['bracketed'] else 'no (extrapolated)'} |")
  if "params_law" in analysis:
    n, d = analysis["params_law"], analysis["tokens_law"]
    lines += ["", f"- N*(C) = {n['coefficient']:.3g} C^{n['exponent']:.3f}; "
              f"D*(C) = {d['coefficient']:.3g} C^{d['exponent']:.3f} "
              "(Chinchilla: both exponents about 0.5)",
              f"- tokens per parameter at the optimum: {analysis['tokens_per_param_geomean']:.1f} "
              f"(geometric mean over budgets; Chinchilla: about "
              f"{CHINCHILLA_TOKENS_PER_PARAM:.0f})"]
  return "\n".join(lines) + "\n"


def plot(points: Sequence[dict], analysis: dict, isoflop_path: str, laws_path: str) -> None:
  """isoflop_path: loss vs params per budget with the parabolas and optima;
  laws_path: N* and D* against compute with the fitted power laws."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, r in enumerate(analysis["budgets"]):
    color = colors[i % len(colors)]
    group = sorted((p for p in points if float(p["budget"]) == r["budget"]),
                   key=lambda p: p["params"])
    xs = np.array([p["params"] for p in group], float)
    ax.scatter(xs, [p["loss"] for p in group], color=color, label=f"C = {r['budget']:.2g}")
    grid = np.exp(np.linspace(np.log(xs.min()) - 0.2, np.log(xs.max()) + 0.2, 100))
    ax.plot(grid, np.polyval(r["coefficients"], np.log(grid)), color=color, alpha=0.6)
    if r["params_opt"] is not None:
      ax.scatter([r["params_opt"]], [r["loss_opt"]], color=color, marker="*", s=180,
                 edgecolor="black", zorder=3)
  ax.set_xscale("log")
  ax.set_xlabel("parameters N")
  ax.set_ylabel("final eval loss (nats/token)")
  ax.set_title("IsoFLOP curves (star: fitted optimum)")
  ax.legend()
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(isoflop_path, dpi=90)
  plt.close(fig)
  optima = [r for r in analysis["budgets"] if r["params_opt"] is not None]
  if "params_law" not in analysis:
    return
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  c = np.array([r["budget"] for r in optima])
  grid = np.exp(np.linspace(np.log(c.min()) - 0.3, np.log(c.max()) + 0.3, 50))
  for key, law, label in (("params_opt", "params_law", "N* (params)"),
                          ("tokens_opt", "tokens_law", "D* (tokens)")):
    ax.scatter(c, [r[key] for r in optima], label=label)
    fit = analysis[law]
    ax.plot(grid, fit["coefficient"] * grid ** fit["exponent"], alpha=0.6,
            label=f"{fit['coefficient']:.2g} C^{fit['exponent']:.2f}")
  ax.plot(grid, np.sqrt(grid / (6 * CHINCHILLA_TOKENS_PER_PARAM)), "k--", alpha=0.4,
          label="Chinchilla N* (D = 20 N)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("compute C (FLOPs)")
  ax.set_title("Compute-optimal params and tokens")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")
  fig.tight_layout()
  fig.savefig(laws_path, dpi=90)
  plt.close(fig)
