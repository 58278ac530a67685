"""Pretraining text that does not fit in memory (`config.data.streaming=True`).

Text / JSONL shards (or a TFDS split prepared as array_record, read by index) are read
lazily, one document at a time, tokenized and packed on
the fly by `grain` (Google's data loader for JAX): documents -> token pairs ->
`ConcatThenSplitIterDataset` rows of seq_len (a document that does not fit is split,
the rest opens the next row, positions restart at 0 as in `llm.data.packing`) ->
batches. Memory holds one open file, the packer's buffer and one batch, whatever the
size of the corpus.

Each process reads only its own files (`shard_files`: file i goes to process
i % process_count; of TFDS, every process_count-th example) and makes its own rows of
every global batch; the file (example) order is shuffled per epoch by (shuffle_seed, epoch). The iterator's position is grain's
state: the reader's (epoch, file, byte offset) plus the packer's remainder, JSON-sized,
saved in the checkpoint for every process, so a resumed run continues with the very
next batch. Validation is the ~2% of documents held out by the stable text hash of
`llm.data.sources` (training skips them); evaluation packs the first of them
(at most `EVAL_MAX_CHARS` characters) in memory.

grain, not a home-made loader: its packing and iterator states are tested upstream and
are what JAX users checkpoint. Its states are promised restorable only by the grain
version that wrote them: requirements.txt keeps it at 0.2.x (check a resume after an upgrade).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Optional, Sequence

import grain
import numpy as np

from llm.config import ConfigError
from llm.data import corpus, packing, pipeline, sources
from llm.data.iterator import process_slice

Batch = dict[str, np.ndarray]
EVAL_MAX_CHARS = 1 << 20  # validation text packed for evaluation (read from the start)


def shard_files(paths: Sequence[str], process_index: int, process_count: int) -> list[str]:
  """This process's files: every process_count-th, so processes read disjoint data."""
  if len(paths) < process_count:
    raise ConfigError(f"config.data.streaming: {len(paths)} file(s) for {process_count} "
                      "processes; each process reads its own files, so split the data into "
                      f"at least {process_count} shards")
  return list(paths[process_index::process_count])


def _decode(raw: bytes, path: str, line: int, encoding: str) -> str:
  try:
    return raw.decode(encoding)
  except UnicodeDecodeError as e:
    raise sources.DataError(f"{path}:{line}: not valid {encoding} (byte 0x{raw[e.start]:02x}); "
                            "convert the file, or set config.data.encoding to its encoding"
                            ) from None


def _read_document(f, kind: str, path: str, line: int, text_key: str, encoding: str):
  """(document or None at the end of the file, lines consumed) from the file's position.

  text: a paragraph (lines up to a blank line); jsonl: the text of the next record.
  """
  consumed, lines = 0, []
  while True:
    raw = f.readline()
    if not raw:
      return ("\n".join(lines).strip() or None), consumed
    consumed += 1
    text = _decode(raw, path, line + consumed, encoding)
    if kind == "jsonl":
      if not text.strip():
        continue
      try:
        record = json.loads(text)
      except json.JSONDecodeError as e:
        raise sources.DataError(f"{path}:{line + consumed}: not valid JSON ({e.msg})") from None
      value = record.get(text_key) if isinstance(record, dict) else None
      if not isinstance(value, str):
        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise sources.DataError(f"{path}:{line + consumed}: no string under "
                                f"config.data.text_key={text_key!r} (found: {keys})")
      if value.strip():
        return value, consumed
    elif text.strip():
      lines.append(text.rstrip("\r\n"))
    elif lines:
      return "\n".join(lines).strip(), consumed


@dataclasses.dataclass(frozen=True)
class FileSpec:
  """What the document reader reads: files in a fixed order and how to parse them."""

  paths: tuple[str, ...]
  kind: str  # "text" | "jsonl"
  text_key: str
  encoding: str
  split: str  # "train" | "validation": the documents of the held-out hash split
  seed: int
  epochs: Optional[int] = None  # None: endless (training)
  shuffle: bool = True  # file order per epoch from (seed, epoch)


class FileDocuments(grain.IterDataset):
  """The documents of a list of text / JSONL files, read lazily (see FileSpec)."""

  def __init__(self, spec: FileSpec):
    super().__init__()
    self._spec = spec

  def __iter__(self):
    return _FileDocumentsIterator(self._spec)


class _FileDocumentsIterator(grain.DatasetIterator):
  """State: the next document is at byte `offset` (line `line`) of file `file` of the
  epoch's file order."""

  def __init__(self, spec: FileSpec):
    super().__init__()
    self._spec = spec
    self._epoch = self._file = self._offset = self._line = 0
    self._handle, self._found = None, False  # found: a document of the split, this epoch
    self._order: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

  def _path(self) -> str:
    if self._order[0] != self._epoch:
      count = len(self._spec.paths)
      order = (np.random.default_rng([self._spec.seed, self._epoch]).permutation(count)
               if self._spec.shuffle else np.arange(count))
      self._order = (self._epoch, order)
    return self._spec.paths[int(self._order[1][self._file])]

  def _open(self):
    path = self._path()
    try:
      self._handle = open(path, "rb")  # pylint: disable=consider-using-with
    except OSError as e:
      raise sources.DataError(f"{path}: cannot be read ({e.strerror or e}); check it") from None
    self._handle.seek(self._offset)

  def _close(self):
    if self._handle is not None:
      self._handle.close()
      self._handle = None

  def __next__(self) -> str:
    spec = self._spec
    while True:
      if spec.epochs is not None and self._epoch >= spec.epochs:
        raise StopIteration
      if self._handle is None:
        self._open()
      document, lines = _read_document(self._handle, spec.kind, self._path(), self._line,
                                       spec.text_key, spec.encoding)
      self._offset, self._line = self._handle.tell(), self._line + lines
      if document is None:  # the end of this file: the next file, or the next epoch
        self._close()
        self._file, self._offset, self._line = self._file + 1, 0, 0
        if self._file == len(spec.paths):
          if not self._found and spec.epochs is None:  # else an endless search
            raise sources.DataError(
                f"config.data.streaming: {', '.join(spec.paths[:3])}"
                f"{'...' if len(spec.paths) > 3 else ''} hold no {spec.split} document; add text")
          self._epoch, self._file, self._found = self._epoch + 1, 0, False
        continue
      if corpus.split_of(document, sources.LOCAL_VALIDATION_PERCENT) == spec.split:
        self._found = True
        return document

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "file": self._file, "offset": self._offset,
            "line": self._line}

  def set_state(self, state: Mapping[str, Any]):
    self._close()
    self._epoch, self._file = int(state["epoch"]), int(state["file"])
    self._offset, self._line = int(state["offset"]), int(state["line"])
    self._found = True  # unknown for the epoch in progress: not an empty one


def _token_pairs(tokenizer) -> Callable[[str], dict]:
  """A document as (input, target) pairs of [bos] + ids + [eos] (length - 1 pairs)."""
  def pairs(document: str) -> dict:
    ids = np.asarray([tokenizer.bos_id, *tokenizer.encode(document), tokenizer.eos_id],
                     np.int32)
    return {"inputs": ids[:-1], "targets": ids[1:]}
  return pairs


def _row(packed: dict) -> Batch:
  segment_ids = packed["inputs_segment_ids"].astype(np.int32)
  return {"inputs": packed["inputs"], "targets": packed["targets"],
          "segment_ids": segment_ids, "positions": packed["inputs_positions"].astype(np.int32),
          "weights": (segment_ids > 0).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """A TFDS split read by index from its random-access (array_record) source."""

  name: str
  split: str
  data_dir: Optional[str]
  download: bool
  text_key: str
  seed: int


def tfds_documents(spec: TfdsSpec, process_index: int = 0,
                   process_count: int = 1) -> grain.IterDataset:
  """Every process_count-th example of the split (this process's), in a fresh order each
  epoch from (seed, epoch), endlessly, as text."""
  from llm.data import tfds_source  # pylint: disable=import-outside-toplevel
  source = tfds_source.random_access_source(spec.name, spec.split, data_dir=spec.data_dir,
                                            download=spec.download)
  if len(source) < process_count:
    raise ConfigError(f"config.data.streaming: split {spec.split!r} of TFDS dataset "
                      f"{spec.name!r} has {len(source)} examples for {process_count} processes")
  mine = grain.MapDataset.source(source)[process_index::process_count]
  text = lambda example: tfds_source.example_text(example, spec.text_key, spec.name)
  # Read in this thread: grain's reader threads would contend with tokenizing for the GIL.
  return mine.shuffle(seed=spec.seed).repeat().map(text).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def process_documents(spec, process_index: int = 0, process_count: int = 1):
  """This process's documents of a FileSpec (its files) or a TfdsSpec (its examples)."""
  if isinstance(spec, TfdsSpec):
    return tfds_documents(spec, process_index, process_count)
  return FileDocuments(dataclasses.replace(
      spec, paths=tuple(shard_files(spec.paths, process_index, process_count))))


def packed_rows(documents_ds: grain.IterDataset, tokenizer, seq_len: int) -> grain.IterDataset:
  """Rows of `packing.FEATURES`, each (seq_len,), of the documents."""
  pairs = documents_ds.map(_token_pairs(tokenizer))
  packed = grain.experimental.ConcatThenSplitIterDataset(
      pairs, length_struct={"inputs": seq_len, "targets": seq_len})
  return packed.map(_row)


@dataclasses.dataclass(frozen=True)
class StreamRows:
  """Training rows not yet read: `llm.data.train_batches` streams them (StreamIterator)."""

  spec: Any  # FileSpec | TfdsSpec
  tokenizer: Any
  seq_len: int


def file_spec(data_cfg, split: str, paths: Sequence[str], epochs: Optional[int] = None,
              shuffle: bool = True) -> FileSpec:
  kind, _ = sources.parse_source(data_cfg.source)
  return FileSpec(tuple(paths), kind, data_cfg.text_key, data_cfg.encoding,
                  sources.local_split(data_cfg, split), data_cfg.shuffle_seed, epochs, shuffle)


def check_streaming(data_cfg, rows_fn) -> list[str]:
  """The files of a streaming config ([] for TFDS), or a one-line ConfigError saying what
  to change."""
  kind, arg = sources.parse_source(data_cfg.source)
  if kind not in ("text", "jsonl", "tfds") or data_cfg.sources:
    raise ConfigError(f"config.data.streaming=True reads text:/jsonl: files or tfds:, not "
                      f"config.data.source={data_cfg.source!r}"
                      f"{' with config.data.sources' if data_cfg.sources else ''}; "
                      "give one of those or set config.data.streaming=False")
  if rows_fn is not pipeline.packed_lm_rows:
    raise ConfigError(f"config.data.streaming=True packs rows for clm / prefix_lm, not "
                      f"config.data.objective={data_cfg.objective!r}; set "
                      "config.data.streaming=False")
  if data_cfg.max_documents:
    raise ConfigError(f"config.data.max_documents={data_cfg.max_documents} limits in-memory "
                      "reading; with config.data.streaming=True set it to 0")
  return [] if kind == "tfds" else sources.resolve_paths(data_cfg, arg)


def rows(rows_fn, data_cfg, tokenizer, split: str):
  """StreamRows for training; evaluation rows (the first held-out documents, or the first
  of TFDS's eval split) packed in memory."""
  paths = check_streaming(data_cfg, rows_fn)
  kind, arg = sources.parse_source(data_cfg.source)
  if split == data_cfg.train_split:
    spec = TfdsSpec(arg, split, data_cfg.data_dir, data_cfg.tfds_download, data_cfg.text_key,
                    data_cfg.shuffle_seed) if kind == "tfds" else file_spec(data_cfg, split, paths)
    return StreamRows(spec, tokenizer, data_cfg.seq_len)
  texts = documents(data_cfg, split, EVAL_MAX_CHARS)
  if not texts:
    raise sources.DataError(f"config.data.streaming: split {split!r} of config.data.source="
                            f"{data_cfg.source!r} has no document; add text")
  return packing.pack_documents(packing.tokenize_documents(tokenizer, texts), data_cfg.seq_len,
                                bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)


def documents(data_cfg, split: str, max_chars: Optional[int]) -> list[str]:
  """The first documents of `split` in file order, up to `max_chars` characters (a
  tokenizer's training text, evaluation text, sample prompts): read lazily."""
  kind, arg = sources.parse_source(data_cfg.source)
  if kind == "tfds":  # reads in chunks, stopping at max_chars
    return sources.load_documents(dataclasses.replace(data_cfg, streaming=False), split,
                                  max_chars)
  spec = file_spec(data_cfg, split, sources.resolve_paths(data_cfg, arg), epochs=1,
                   shuffle=False)
  texts, total = [], 0
  for text in FileDocuments(spec):
    texts.append(text)
    total += len(text)
    if max_chars is not None and total >= max_chars:
      break
  return texts


class StreamIterator:
  """This process's rows of each global batch, streamed; `state` is every process's
  grain state, so each resumes where it was."""

  def __init__(self, stream: StreamRows, batch_size: int, seed: int,
               state: Optional[Mapping] = None, process_index: int = 0,
               process_count: int = 1, gather: Optional[Callable] = None):
    del seed  # in stream.spec
    part = process_slice(batch_size, process_index, process_count)
    self._process_index, self._process_count = process_index, process_count
    self._gather = gather or all_gather_json
    dataset = packed_rows(process_documents(stream.spec, process_index, process_count),
                          stream.tokenizer, stream.seq_len)
    self._iterator = iter(dataset.batch(part.stop - part.start, drop_remainder=True))
    if state is not None:
      self._iterator.set_state(self._own_state(state))

  def _own_state(self, state: Mapping) -> dict:
    if set(state) != {"streaming"}:
      raise ConfigError(f"the checkpoint's data state {sorted(state)} is not of a streaming "
                        "run; resume with the same config.data.streaming")
    states = state["streaming"]
    if len(states) != self._process_count:
      raise ConfigError(f"the checkpoint's data stream is of {len(states)} process(es), not "
                        f"{self._process_count}; resume streaming with as many processes")
    return states[self._process_index]

  @property
  def state(self) -> dict:
    """JSON-serializable: {"streaming": [state of process 0, 1, ...]} (collective when
    there are several processes: every process calls it when saving)."""
    own = self._iterator.get_state()
    if self._process_count == 1:
      return {"streaming": [own]}
    return {"streaming": self._gather(own)}

  @property
  def metrics(self) -> dict:
    return {}

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    return next(self._iterator)


def all_gather_json(own: Any) -> list:
  """Every process's JSON-able `own`, in process order (a small collective; every process
  must call it)."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  blob = np.frombuffer(json.dumps(own).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([blob.size], np.int64))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:blob.size] = blob
  blobs = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(b[:int(n)]).decode()) for b, n in zip(blobs, np.ravel(sizes))]
