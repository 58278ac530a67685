"""Evaluating a trained model on task sets and on language-modelling text, and the
markdown table that compares several models (e.g. before / after fine-tuning, for
catastrophic forgetting)."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from llm.config import DataConfig
from llm.data.packing import build_dataset
from llm.data.sft_data import load_tasks
from llm.eval.likelihood import log_likelihood, perplexity
from llm.eval.tasks import evaluate_task
from llm.models import build


def lm_perplexity(cfg, params, tokenizer, source: str = "embedded", rows: int = 64,
                  batch_size: int = 16) -> float:
  """Perplexity of a decoder on `source`'s validation text (the pretraining data by
  default): what fine-tuning should not destroy."""
  seq_len = min(128, cfg.model.max_len)
  data_cfg = DataConfig(source=source, seq_len=seq_len, batch_size=batch_size)
  data = build_dataset(data_cfg, tokenizer, data_cfg.eval_split)
  module = build(cfg.model)
  n = min(rows, len(data["inputs"])) // batch_size * batch_size
  logps, weights = [], []
  for start in range(0, n, batch_size):
    batch = {k: v[start:start + batch_size] for k, v in data.items()}
    logps.append(np.asarray(log_likelihood(module, params, batch)))
    weights.append(batch["weights"])
  return perplexity(np.concatenate(logps), np.concatenate(weights))


def evaluate_model(cfg, params, tokenizer, tasks: str, ks: Sequence[int] = (0,),
                   split: str = "test", max_examples: int | None = 100,
                   lm_source: str | None = "embedded") -> dict:
  """{"tasks": {task: {k: scores}}, "lm_perplexity": float} for one model (an encoder
  with a classifier head: its head's accuracy)."""
  head = params.get("classifier", {}).get("kernel")
  module = build(cfg.model, num_labels=0 if head is None else head.shape[-1])
  data_cfg = dataclasses.replace(cfg.data, tasks=tasks)
  results: dict = {"tasks": {}}
  for task in load_tasks(data_cfg, data_cfg.shuffle_seed)[0]:
    results["tasks"][task.name] = {
        k: evaluate_task(module, params, tokenizer, task, split=split, k_shot=k,
                         max_examples=max_examples) for k in ks}
  if lm_source and cfg.model.family == "decoder":
    results["lm_perplexity"] = lm_perplexity(cfg, params, tokenizer, lm_source)
  return results


def markdown_table(results: Mapping[str, dict]) -> str:
  """One row per model, one column per (task, k, metric), plus LM perplexity."""
  columns: list[tuple] = []
  for result in results.values():
    for task, by_k in result["tasks"].items():
      for k, scores in by_k.items():
        columns += [(task, k, m) for m in scores if m != "n" and (task, k, m) not in columns]
  has_ppl = any("lm_perplexity" in r for r in results.values())
  header = ["model"] + [f"{t} {k}-shot {m}" for t, k, m in columns] + (
      ["LM perplexity"] if has_ppl else [])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, result in results.items():
    cells = [name] + [_fmt(result["tasks"].get(t, {}).get(k, {}).get(m)) for t, k, m in columns]
    if has_ppl:
      cells.append(_fmt(result.get("lm_perplexity")))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _fmt(value) -> str:
  return "-" if value is None else f"{value:.2f}"
