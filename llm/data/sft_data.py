"""The sft objective's data: `config.data.tasks` -> tasks -> (prompt, completion) pairs
-> one right-padded row per example (`llm.data.sft.sft_rows`).

`data.tasks` is a comma-separated list of `name[:rate]`: a generated task of
`llm.data.tasks`, `tfds:NAME`, or `jsonl:PATH` (records with `data.prompt_key` and
`data.completion_key`; the last 5% of the file is held out for validation). Several
tasks make a multitask mixture: with rates, examples are drawn at those rates; without,
in proportion to each task's size.
"""

from __future__ import annotations

import logging

import numpy as np

from llm.config import ConfigError
from llm.data.mixture import Mixture
from llm.data.sft import sft_rows
from llm.data.task_sources import jsonl_task, load_task
from llm.data.tasks import Task
from llm.data.templates import Template

log = logging.getLogger(__name__)
JSONL_PREFIX = "jsonl:"
HELD_OUT = 0.05


def parse_tasks(spec: str) -> list[tuple[str, float | None]]:
  """"a:2,b" -> [("a", 2.0), ("b", None)]."""
  out = []
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    name, _, rate = part.rpartition(":") if _has_rate(part) else (part, "", "")
    try:
      out.append((name, float(rate) if rate else None))
    except ValueError:
      raise ConfigError(f"config.data.tasks: {part!r}: the rate after ':' must be a number"
                        ) from None
  return out


def _has_rate(part: str) -> bool:
  head, sep, tail = part.rpartition(":")
  return bool(sep) and bool(head) and tail.replace(".", "", 1).isdigit()


def _jsonl_task(path: str, data_cfg) -> Task:
  template = Template(f"{{{data_cfg.prompt_key}}}", f"{{{data_cfg.completion_key}}}",
                      name=path)
  records = jsonl_task(path, {"train": path}, template, "exact_match",
                       encoding=data_cfg.encoding).records("train")
  cut = len(records) - max(1, int(len(records) * HELD_OUT)) if len(records) > 1 else 1
  return Task(path, {"train": tuple(records[:cut]), "validation": tuple(records[cut:])},
              template, "exact_match")


def load_tasks(data_cfg, seed: int) -> tuple[list[Task], dict | None]:
  specs = parse_tasks(data_cfg.tasks)
  tasks = [_jsonl_task(name[len(JSONL_PREFIX):], data_cfg) if name.startswith(JSONL_PREFIX)
           else load_task(name, seed=seed, data_dir=data_cfg.data_dir) for name, _ in specs]
  rates = [rate for _, rate in specs]
  if all(r is None for r in rates):
    return tasks, None
  if any(r is None for r in rates):
    raise ConfigError(f"config.data.tasks={data_cfg.tasks!r}: give every task a rate or none")
  return tasks, {task.name: rate for task, rate in zip(tasks, rates)}


def classification_labels(tasks: list[Task]) -> tuple[str, ...]:
  """The one label set of classification tasks: what an encoder's classifier head
  predicts (index i = labels[i])."""
  names = ", ".join(t.name for t in tasks)
  if any(not t.labels for t in tasks):
    raise ConfigError(f"config.data.tasks={names!r}: an encoder fine-tunes on classification "
                      "tasks (with labels, e.g. topic); use a decoder or an encoder_decoder "
                      "for generation tasks")
  if len({t.labels for t in tasks}) > 1:
    raise ConfigError(f"config.data.tasks={names!r}: the classification tasks have different "
                      "label sets; an encoder's head trains on one, so give tasks sharing it")
  return tasks[0].labels


def sft_split_rows(cfg, data_cfg, tokenizer, split: str) -> dict[str, np.ndarray]:
  """Rows for `split`: training draws steps x batch examples from the mixture (so the
  rates hold exactly as configured); evaluation takes every task's validation records."""
  tasks, rates = load_tasks(data_cfg, data_cfg.shuffle_seed)
  if split == data_cfg.train_split and len(tasks) > 1:
    count = cfg.train.steps * data_cfg.batch_size
    pairs = Mixture(tasks, rates, seed=data_cfg.shuffle_seed,
                    split=data_cfg.train_split).pairs(0, count)
  else:
    task_split = "validation" if split == data_cfg.eval_split else split
    pairs = [pair for task in tasks for pair in task.pairs(task_split)]
  if not pairs:
    return {}  # the objective names the empty split (llm.objectives.check_rows)
  labels = classification_labels(tasks) if cfg.model.family == "encoder" else ()
  rows, truncated = sft_rows(pairs, tokenizer, data_cfg.seq_len, cfg.model.family,
                             labels=labels)
  if truncated:
    log.warning("%d of %d %s examples had their prompt cut on the left to fit data.seq_len=%d",
                truncated, len(pairs), split, data_cfg.seq_len)
  return rows
