"""Multitask mixtures with per-task rates (FLAN / T5 style); `WeightedDraws` is the
sampler under them, also used for pretraining source mixtures (`llm.data.source_mixture`).

Example i of a mixture comes from task t with probability rates[t], independently of
the others; each task serves its records in a fresh permutation every epoch of its
own. Everything is a pure function of (seed, i), so the state of a run is the index
of the next example: `pairs(start, count)` resumes anywhere.

Rates are explicit, or examples-proportional: task t gets min(len(train_t), cap).
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional, Sequence

import numpy as np

from llm.config import ConfigError
from llm.data.tasks import Task

_BLOCK = 4096  # task choices are drawn a block at a time


def mixing_rates(tasks: Sequence[Task], rates: Optional[Mapping[str, float]] = None,
                 cap: Optional[int] = None, split: str = "train") -> tuple[float, ...]:
  """Normalised rates, in task order: explicit, or proportional to min(size, cap)."""
  names = [task.name for task in tasks]
  if not tasks or len(set(names)) != len(names):
    raise ConfigError(f"mixture tasks {names}: need at least one, each name once")
  if rates is not None:
    if cap is not None:
      raise ConfigError("mixture: give explicit rates or a cap (examples-proportional), "
                        "not both")
    unknown = sorted(set(rates) - set(names))
    missing = [n for n in names if n not in rates]
    if unknown or missing:
      raise ConfigError(f"mixture rates: unknown tasks {unknown}, tasks without a rate "
                        f"{missing}; give one rate per task of {names}")
    weights = np.array([float(rates[n]) for n in names])
  else:
    if cap is not None and cap < 1:
      raise ConfigError(f"mixture cap={cap}: must be >= 1 (or None for no cap)")
    sizes = np.array([len(task.records(split)) for task in tasks], np.float64)
    weights = sizes if cap is None else np.minimum(sizes, cap)
  return normalized_weights(names, weights, "mixture rates")


def normalized_weights(names: Sequence[str], weights, what: str) -> tuple[float, ...]:
  """`weights` scaled to sum to 1; each must be finite and >= 0, their sum > 0."""
  weights = np.asarray(weights, np.float64)
  if not np.all(np.isfinite(weights)) or (weights < 0).any() or weights.sum() <= 0:
    raise ConfigError(f"{what} {dict(zip(names, weights.tolist()))}: must be >= 0 "
                      "with a positive sum")
  return tuple((weights / weights.sum()).tolist())


@functools.lru_cache(maxsize=64)
def _block_choices(seed: int, block: int, rates: tuple[float, ...]) -> np.ndarray:
  choices = np.random.default_rng([seed, block]).choice(len(rates), _BLOCK, p=rates)
  choices.flags.writeable = False  # shared through the cache
  return choices


@functools.lru_cache(maxsize=4096)
def _block_counts(seed: int, block: int, rates: tuple[float, ...]) -> np.ndarray:
  return np.bincount(_block_choices(seed, block, rates), minlength=len(rates))


@functools.lru_cache(maxsize=64)
def _epoch_order(seed: int, task: int, epoch: int, size: int) -> np.ndarray:
  return np.random.default_rng([seed, task, epoch, 1]).permutation(size)


class WeightedDraws:
  """Which part each example of an endless stream comes from, drawn at `rates`, and
  which of that part's items it is: each part serves its items in a fresh permutation
  every epoch of its own. A pure function of (seed, example index), so a stream
  resumes anywhere."""

  def __init__(self, sizes: Sequence[int], rates: Sequence[float], seed: int = 0):
    self.sizes, self.rates, self.seed = tuple(int(n) for n in sizes), tuple(rates), seed

  def parts(self, start: int, count: int) -> np.ndarray:
    """The part of each example start, ..., start + count - 1."""
    if start < 0 or count < 0:
      raise ConfigError(f"mixture examples [{start}, {start + count}): must be >= 0")
    first, last = start // _BLOCK, (start + count - 1) // _BLOCK
    blocks = [_block_choices(self.seed, b, self.rates) for b in range(first, last + 1)]
    flat = np.concatenate(blocks) if blocks else np.zeros(0, np.int64)
    return flat[start - first * _BLOCK:][:count]

  def ordinals(self, start: int, parts_N: np.ndarray) -> np.ndarray:
    """How many earlier examples of the stream each example's part has served."""
    block = start // _BLOCK
    before_P = sum((_block_counts(self.seed, b, self.rates) for b in range(block)),
                   np.zeros(len(self.rates), np.int64))
    head = self.parts(block * _BLOCK, start - block * _BLOCK)
    before_P = before_P + np.bincount(head, minlength=len(self.rates))
    ordinals = np.empty(len(parts_N), np.int64)
    for t in range(len(self.rates)):
      at = np.flatnonzero(parts_N == t)
      ordinals[at] = before_P[t] + np.arange(len(at))
    return ordinals

  def draws(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(part, item index within the part) of examples start, ..., start + count - 1."""
    parts_N = self.parts(start, count)
    items_N = np.empty(len(parts_N), np.int64)
    for i, (t, ordinal) in enumerate(zip(parts_N.tolist(),
                                         self.ordinals(start, parts_N).tolist())):
      size = self.sizes[t]
      items_N[i] = _epoch_order(self.seed, t, ordinal // size, size)[ordinal % size]
    return parts_N, items_N


class Mixture:
  """An endless, resumable stream of (task name, record) drawn from `tasks` at `rates`."""

  def __init__(self, tasks: Sequence[Task], rates: Optional[Mapping[str, float]] = None,
               cap: Optional[int] = None, seed: int = 0, split: str = "train"):
    self.tasks = tuple(tasks)
    self.rates = mixing_rates(self.tasks, rates, cap, split)
    self.seed, self.split = seed, split
    self._records = [task.records(split) for task in self.tasks]
    for task, records, rate in zip(self.tasks, self._records, self.rates):
      if not records and rate > 0:
        raise ConfigError(f"mixture: task {task.name!r} has no {split!r} records; "
                          "give it rate 0 or drop it")
    self._draws = WeightedDraws([len(r) for r in self._records], self.rates, seed)

  def task_indices(self, start: int, count: int) -> np.ndarray:
    """Which task each example start, ..., start + count - 1 comes from."""
    return self._draws.parts(start, count)

  def draws(self, start: int, count: int) -> list[tuple[str, dict]]:
    """(task name, record) of examples start, ..., start + count - 1."""
    parts_N, items_N = self._draws.draws(start, count)
    return [(self.tasks[t].name, self._records[t][i])
            for t, i in zip(parts_N.tolist(), items_N.tolist())]

  def pairs(self, start: int, count: int) -> list[tuple[str, str]]:
    """(prompt, completion) of examples start, ..., start + count - 1, by each
    task's template: feed them to `llm.data.sft.sft_rows`."""
    by_name = {task.name: task for task in self.tasks}
    return [by_name[name].template.apply(record) for name, record in self.draws(start, count)]
