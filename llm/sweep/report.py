"""A sweep's results: DIR/results.csv, results.md and PNGs, from the trial workdirs.

One row per trial: its overrides and tags, status, final train / eval loss, tokens
seen, parameters, training FLOPs, wall time and tokens/s. Plots: eval-loss curves of
all trials overlaid, and the final eval loss against each field the sweep varies. A
sweep whose trials carry `tag.budget` is an IsoFLOP study and also gets its fit.
"""

from __future__ import annotations

import csv
import os

from llm.sweep import isoflop, results, spec as spec_lib, worker as worker_lib

CSV_FILE, MD_FILE = "results.csv", "results.md"
CURVES_FILE = "eval_curves.png"
METRIC_COLUMNS = ("train_loss", "eval_loss", "step", "tokens", "params", "active_params",
                  "flops", "wall_s", "tokens_per_s")


def fields_of(definition: dict) -> list[str]:
  """The override and tag keys of all trials, in first-seen order."""
  seen: dict = {}
  for trial in definition["trials"].values():
    for key in trial["overrides"]:
      seen.setdefault(key, None)
    for key in trial["tags"]:
      seen.setdefault(spec_lib.TAG + key, None)
  return list(seen)


def rows(sweep_dir: str, definition: dict) -> list[dict]:
  out = []
  for name, trial in definition["trials"].items():
    workdir = os.path.join(sweep_dir, name)
    status = results.trial_status(workdir)
    row = {"trial": name, "status": status["status"], **trial["overrides"],
           **{spec_lib.TAG + k: v for k, v in trial["tags"].items()},
           **results.summarize_workdir(workdir), "wall_s": status["wall_s"],
           "error": status["error"] or ""}
    out.append(row)
  return out


def varying(table: list[dict], fields: list[str]) -> list[str]:
  return [f for f in fields if len({repr(r.get(f)) for r in table}) > 1]


def _cell(value, column: str = "") -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4f}" if column.endswith("_loss") else f"{value:.4g}"
  if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
    return f"{value:.3g}"
  return str(value)


def markdown_table(table: list[dict], columns: list[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in table:
    lines.append("| " + " | ".join(_cell(row.get(c), c).replace("|", "/") for c in columns) + " |")
  return "\n".join(lines) + "\n"


def write(sweep_dir: str) -> dict:
  """Writes the tables and plots; returns {"table": rows, "files": paths, "isoflop": ...}."""
  definition = worker_lib.read_definition(sweep_dir)
  if definition is None:
    raise FileNotFoundError(f"{sweep_dir} holds no {worker_lib.DEFINITION_FILE}; pass the "
                            "--workdir of a sweep (python -m experiments.sweep)")
  fields = fields_of(definition)
  table = rows(sweep_dir, definition)
  columns = ["trial", "status", *fields, *METRIC_COLUMNS, "error"]
  with open(os.path.join(sweep_dir, CSV_FILE), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(table)
  files = [os.path.join(sweep_dir, CSV_FILE)]
  counts = {s: sum(r["status"] == s for r in table) for s in dict.fromkeys(
      r["status"] for r in table)}
  md = [f"# Sweep {definition['config']}", "",
        ", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(table)} trials.", "",
        markdown_table(table, [c for c in columns if c != "error" or any(r["error"] for r in table)])]
  files += _plot_curves(sweep_dir, definition, table)
  for field in varying(table, fields):
    files += _plot_field(sweep_dir, table, field)
  analysis = None
  points = [{"budget": r[spec_lib.TAG + "budget"], "params": r["params"], "loss": r["eval_loss"]}
            for r in table if r["status"] == "complete" and spec_lib.TAG + "budget" in r
            and "eval_loss" in r]
  if points:
    analysis = isoflop.analyze(points)
    md += ["", isoflop.markdown(analysis)]
    paths = [os.path.join(sweep_dir, n) for n in ("isoflop.png", "isoflop_laws.png")]
    isoflop.plot(points, analysis, *paths)
    files += [p for p in paths if os.path.exists(p)]
  md += ["", "Plots: " + ", ".join(os.path.basename(p) for p in files if p.endswith(".png"))]
  with open(os.path.join(sweep_dir, MD_FILE), "w") as f:
    f.write("\n".join(md) + "\n")
  return {"table": table, "files": [os.path.join(sweep_dir, MD_FILE), *files],
          "isoflop": analysis, "markdown": "\n".join(md)}


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _plot_curves(sweep_dir: str, definition: dict, table: list[dict]) -> list[str]:
  """Eval loss against tokens seen (comparable across batch sizes and step counts)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  drawn = 0
  for row in table:
    workdir = os.path.join(sweep_dir, row["trial"])
    saved = results.read_json(os.path.join(workdir, results.CONFIG_FILE))
    points = results.curve(results.read_metrics(workdir))
    if not points or saved is None:
      continue
    per_step = saved["data"]["batch_size"] * saved["data"]["seq_len"]
    ax.plot([s * per_step for s, _ in points], [v for _, v in points], marker=".",
            label=row["trial"])
    drawn += 1
  if not drawn:
    plt.close(fig)
    return []
  ax.set_xscale("log")
  ax.set_xlabel("tokens seen")
  ax.set_ylabel("eval loss (nats/token)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.tight_layout()
  path = os.path.join(sweep_dir, CURVES_FILE)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return [path]


def _plot_field(sweep_dir: str, table: list[dict], field: str) -> list[str]:
  """Final eval loss against one swept field (log axis for positive ranges over 10x)."""
  done = [r for r in table if r.get("eval_loss") is not None and r.get(field) is not None]
  if not done:
    return []
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  values = [r[field] for r in done]
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  if numeric:
    ax.scatter(values, [r["eval_loss"] for r in done])
    if min(values) > 0 and max(values) >= 10 * min(values):
      ax.set_xscale("log")
  else:
    labels = list(dict.fromkeys(str(v) for v in values))
    ax.scatter([labels.index(str(v)) for v in values], [r["eval_loss"] for r in done])
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
  ax.set_xlabel(field)
  ax.set_ylabel("final eval loss")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(sweep_dir, f"by_{field.replace('.', '_')}.png")
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return [path]
