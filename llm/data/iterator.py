"""Batches of packed rows: shuffled, resumable and split across processes.

The order of an epoch is a permutation seeded by (seed, epoch), so it is a pure
function of the state {"epoch", "index"}: a checkpointed state resumes with the
very next batch, and every process computes the same global batch and keeps
only its own slice of it (no communication needed).
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

Batch = dict[str, np.ndarray]


def _num_rows(arrays: Mapping[str, np.ndarray]) -> int:
  sizes = {len(a) for a in arrays.values()}
  if len(sizes) != 1:
    raise ValueError(f"arrays disagree on the number of rows: {sorted(sizes)}")
  return sizes.pop()


def process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  if batch_size % process_count:
    raise ValueError(f"config.data.batch_size={batch_size} is not divisible by the "
                     f"{process_count} processes; make it a multiple")
  per_process = batch_size // process_count
  return slice(process_index * per_process, (process_index + 1) * per_process)


class BatchIterator:
  """An endless iterator of this process's slice of each global batch.

  Each epoch visits the rows in a fresh order and drops the remainder that does
  not fill a batch, so every batch has the same shape (no recompilation).
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int,
               state: Optional[Mapping[str, int]] = None, process_index: int = 0,
               process_count: int = 1):
    self._arrays = dict(arrays)
    self._batch_size = batch_size
    self._seed = seed
    self._slice = process_slice(batch_size, process_index, process_count)
    num_rows = _num_rows(self._arrays)
    self._batches_per_epoch = num_rows // batch_size
    if self._batches_per_epoch == 0:
      seq_len = next(iter(self._arrays.values())).shape[-1]
      raise ValueError(
          f"config.data.batch_size={batch_size} exceeds the {num_rows} packed rows of "
          f"seq_len={seq_len} in this split; lower config.data.batch_size or "
          "config.data.seq_len, or use more data")
    state = state or {"epoch": 0, "index": 0}
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
    self._order_epoch, self._order = -1, None

  @property
  def state(self) -> dict[str, int]:
    """JSON-serializable position: the next batch is `index` of epoch `epoch`."""
    return {"epoch": self._epoch, "index": self._index}

  @property
  def metrics(self) -> dict:
    """Data metrics for the log (a mixture's tokens per source; none here)."""
    return {}

  @property
  def batches_per_epoch(self) -> int:
    return self._batches_per_epoch

  def _epoch_order(self) -> np.ndarray:
    if self._order_epoch != self._epoch:
      rng = np.random.default_rng([self._seed, self._epoch])
      self._order = rng.permutation(len(next(iter(self._arrays.values()))))
      self._order_epoch = self._epoch
    return self._order

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self._index >= self._batches_per_epoch:
      self._epoch, self._index = self._epoch + 1, 0
    start = self._index * self._batch_size
    rows = self._epoch_order()[start:start + self._batch_size][self._slice]
    self._index += 1
    return {name: array[rows] for name, array in self._arrays.items()}


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int, num_batches: int = 0,
                 process_index: int = 0, process_count: int = 1) -> list[Batch]:
  """The first `num_batches` batches in order (0 = all), every one full-sized.

  The last batch is topped up with all-zero rows, whose weights are 0, so every
  row counts exactly once in weighted metrics and shapes never change.
  """
  part = process_slice(batch_size, process_index, process_count)
  num_rows = _num_rows(arrays)
  available = -(-num_rows // batch_size)
  count = available if num_batches <= 0 else min(num_batches, available)
  batches = []
  for b in range(count):
    batch = {}
    for name, array in arrays.items():
      rows = array[b * batch_size:(b + 1) * batch_size]
      if len(rows) < batch_size:
        padding = np.zeros((batch_size - len(rows),) + array.shape[1:], array.dtype)
        rows = np.concatenate([rows, padding])
      batch[name] = rows[part]
    batches.append(batch)
  return batches
