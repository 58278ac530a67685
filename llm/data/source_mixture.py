"""Pretraining on a mixture of sources by weight (`config.data.sources`), as in
BloombergGPT's general + domain data or the Pile's weighted components.

Each source is turned into rows on its own (packed, cached, exactly as a single
`data.source` would be). Training row i of the run comes from source s with
probability weight[s] / sum(weights), and each source serves its rows in a fresh
permutation every epoch of its own (`llm.data.mixture.WeightedDraws`), so a small
source with a large weight repeats and a large one with a small weight is
subsampled. Everything is a pure function of (seed, i): the iterator state is the
index of the next row plus the tokens seen per source, and a resumed run draws the
very rows it would have drawn. Evaluation interleaves the sources' validation rows.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from llm.config import ConfigError
from llm.data import sources as sources_lib
from llm.data.iterator import BatchIterator, process_slice
from llm.data.mixture import WeightedDraws, normalized_weights

Batch = dict[str, np.ndarray]
_EXAMPLE = "(('embedded:topics', 1), ('embedded:docstrings', 3))"


def check_sources(data_cfg) -> tuple[float, ...]:
  """The normalised weights of `data_cfg.sources`, or a one-line ConfigError."""
  pairs = data_cfg.sources
  for pair in pairs:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
            and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool)):
      raise ConfigError(f"config.data.sources: {pair!r} is not a (source, weight) pair; "
                        f"give e.g. {_EXAMPLE}")
    try:
      sources_lib.parse_source(pair[0])
    except sources_lib.DataError as e:
      raise ConfigError(f"config.data.sources: {e}".replace("config.data.source=", "")) from None
  names = [source for source, _ in pairs]
  if len(set(names)) != len(names):
    raise ConfigError(f"config.data.sources: a source is named twice in {names}; merge its "
                      "weights")
  if data_cfg.objective == "sft":
    raise ConfigError("config.data.sources mixes pretraining text; the sft objective mixes "
                      "tasks by config.data.tasks=name:rate,...")
  return normalized_weights(names, [weight for _, weight in pairs], "config.data.sources")


@dataclasses.dataclass(frozen=True)
class MixedRows:
  """Each source's training rows and its share of the mixture."""

  names: tuple[str, ...]
  rows: tuple[Mapping[str, np.ndarray], ...]
  rates: tuple[float, ...]


def rows(rows_fn: Callable, data_cfg, tokenizer, split: str):
  """`rows_fn(data_cfg, tokenizer, split)`, per source when `data_cfg.sources` is set:
  a MixedRows for training, the sources' rows interleaved for evaluation."""
  if data_cfg.streaming:
    from llm.data import streaming  # grain (about 1 s to import) only when streaming
    return streaming.rows(rows_fn, data_cfg, tokenizer, split)
  if not data_cfg.sources:
    return rows_fn(data_cfg, tokenizer, split)
  names = tuple(source for source, _ in data_cfg.sources)
  per_source = [rows_fn(sources_lib.one_source(data_cfg, name), tokenizer, split)
                for name in names]
  if split == data_cfg.train_split:
    return MixedRows(names, tuple(per_source), check_sources(data_cfg))
  return interleave(per_source)


def interleave(parts: Sequence[Mapping[str, np.ndarray]]) -> Batch:
  """Rows of every part taken in turn (row 0 of each, then row 1, ...), so the first
  evaluation batches hold all parts."""
  order = sorted((i, p, i) for p, part in enumerate(parts) for i in range(_num_rows(part)))
  return {key: np.stack([parts[p][key][i] for _, p, i in order]) for key in parts[0]}


def _num_rows(arrays: Mapping[str, np.ndarray]) -> int:
  return len(next(iter(arrays.values())))


def row_tokens(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
  """Real (non-pad) tokens per row: nonzero segment ids, else nonzero ids (pad is 0)."""
  key = "segment_ids" if "segment_ids" in arrays else next(iter(arrays))
  values = np.asarray(arrays[key])
  return (values.reshape(len(values), -1) != 0).sum(axis=1)


class MixtureIterator:
  """Endless batches drawn from `MixedRows` by weight; this process keeps its slice of
  each global batch. `metrics` holds the tokens seen per source so far."""

  def __init__(self, mixed: MixedRows, batch_size: int, seed: int,
               state: Optional[Mapping] = None, process_index: int = 0,
               process_count: int = 1):
    empty = [n for n, r, w in zip(mixed.names, mixed.rows, mixed.rates) if w and not _num_rows(r)]
    if empty:
      raise ConfigError(f"config.data.sources: {empty[0]} has no training rows; give it more "
                        "text or weight 0")
    self._mixed, self._batch_size = mixed, batch_size
    self._slice = process_slice(batch_size, process_index, process_count)
    self._draws = WeightedDraws([max(1, _num_rows(r)) for r in mixed.rows], mixed.rates, seed)
    self._tokens_R = [row_tokens(r) for r in mixed.rows]
    state = state or {"index": 0, "tokens": {name: 0 for name in mixed.names}}
    if set(state) != {"index", "tokens"} or set(state["tokens"]) != set(mixed.names):
      raise ConfigError(f"the checkpoint's data state {sorted(state)} is not of a mixture of "
                        f"{list(mixed.names)}; resume with the same config.data.sources")
    self._index = int(state["index"])
    self._tokens = {name: int(state["tokens"][name]) for name in mixed.names}

  @property
  def state(self) -> dict:
    return {"index": self._index, "tokens": dict(self._tokens)}

  @property
  def metrics(self) -> dict[str, int]:
    return {f"tokens_seen/{name}": n for name, n in self._tokens.items()}

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    parts_N, items_N = self._draws.draws(self._index, self._batch_size)
    self._index += self._batch_size
    for p, name in enumerate(self._mixed.names):
      self._tokens[name] += int(self._tokens_R[p][items_N[parts_N == p]].sum())
    pairs = list(zip(parts_N[self._slice].tolist(), items_N[self._slice].tolist()))
    return {key: np.stack([self._mixed.rows[p][key][i] for p, i in pairs])
            for key in self._mixed.rows[0]}


def train_batches(train_rows, batch_size: int, seed: int, state=None, process_index: int = 0,
                  process_count: int = 1):
  """The training batch iterator for `train_rows`: by weight for a MixedRows, streamed for
  StreamRows (`config.data.streaming`), else the shuffled epochs of `BatchIterator`."""
  kind = MixtureIterator if isinstance(train_rows, MixedRows) else BatchIterator
  streaming = sys.modules.get("llm.data.streaming")  # imported by whoever streamed the rows
  if streaming is not None and isinstance(train_rows, streaming.StreamRows):
    kind = streaming.StreamIterator
  elif state is not None and "streaming" in state:
    raise ConfigError("the checkpoint's data state is of a streaming run; resume with "
                      "config.data.streaming=True")
  return kind(train_rows, batch_size, seed, state=state, process_index=process_index,
              process_count=process_count)
