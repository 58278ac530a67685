"""SentencePiece tokenizer: load, train in-process, and find the one a run uses.

Trained tokenizers use BPE with byte fallback (any text encodes, nothing is
<unk>), the identity normalization and no whitespace folding, so
`decode(encode(s)) == s` for every string -- code and indentation included.
Ids are fixed so every model agrees on them: pad 0, eos 1, bos 2, unk 3, then
"<mask>" and the span-corruption sentinels "<extra_id_0>", "<extra_id_1>", ...
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
import re
import sys
from typing import Iterable, Iterator, Optional, Sequence

import sentencepiece as spm

from llm.data import cache, sources

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
MASK_PIECE = "<mask>"
TOKENIZER_FILE = "tokenizer.model"
# Bump when the training recipe changes, so cached tokenizers are retrained.
_RECIPE_VERSION = 1
# SentencePiece trains on lines; longer ones are skipped by it, so cut them here.
_MAX_LINE_BYTES = 8192
# Beyond this much text a bigger sample changes the vocabulary little but costs
# time and memory; a deterministic stride sample keeps training in seconds.
_MAX_TRAINING_CHARS = 20_000_000
_NUM_BYTE_PIECES = 256
_DEFAULT_COVERAGE = 0.9995  # SentencePiece's default
_MIN_COVERAGE = 0.98  # the least SentencePiece accepts


def sentinel_piece(i: int) -> str:
  return f"<extra_id_{i}>"


def _last_line(error: Exception) -> str:
  """SentencePiece puts the reason on the last line of its multi-line errors."""
  text = str(error).strip()
  return text.splitlines()[-1] if text else type(error).__name__


class Tokenizer:
  """A SentencePiece model with the special ids the library relies on."""

  def __init__(self, model_proto: bytes, path: str = ""):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.path = path
    self._mask_id = self._piece_id(MASK_PIECE)
    self._sentinel_ids = self._find_sentinels()

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    path = pathlib.Path(path)
    try:
      return cls(path.read_bytes(), str(path))
    except (RuntimeError, OSError) as e:
      raise ValueError(f"{path}: not a readable SentencePiece model ({_last_line(e)})") from None

  # Pickle the serialized model: the SWIG processor itself does not pickle, and
  # data workers in other processes need the tokenizer.
  def __getstate__(self):
    return {"model_proto": self._proto, "path": self.path}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], state["path"])

  def __repr__(self):
    return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"

  def _piece_id(self, piece: str) -> Optional[int]:
    """The id of `piece`, or None: SentencePiece maps unknown pieces to unk."""
    i = self._sp.piece_to_id(piece)
    return i if self._sp.id_to_piece(i) == piece else None

  def _find_sentinels(self) -> list[int]:
    ids = []
    while (i := self._piece_id(sentinel_piece(len(ids)))) is not None:
      ids.append(i)
    return ids

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  # External models may lack a symbol (SentencePiece reports -1); ours have all.
  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def mask_id(self) -> Optional[int]:
    return self._mask_id

  @property
  def sentinel_ids(self) -> list[int]:
    return list(self._sentinel_ids)

  @property
  def model_proto(self) -> bytes:
    return self._proto

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                   add_eos: bool = False) -> list[list[int]]:
    """Encodes many texts at once: far faster than a Python loop over `encode`."""
    return self._sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos,
                           num_threads=os.cpu_count() or 1)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, without pad/bos/eos; callers truncate at eos themselves."""
    hidden = {self.pad_id, self.bos_id, self.eos_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in hidden])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def check_vocab_size(tokenizer: Tokenizer, vocab_size: int, origin: str):
  """Raises a one-line ValueError unless the model's embedding fits the tokenizer."""
  if tokenizer.vocab_size != vocab_size:
    raise ValueError(
        f"{origin} has {tokenizer.vocab_size} pieces but config.model.vocab_size="
        f"{vocab_size}; set config.model.vocab_size={tokenizer.vocab_size} "
        "(or use a fresh workdir / another tokenizer to get a new one)")


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
  """Non-blank lines of a deterministic sample of `texts`, cut to a safe length."""
  texts = [t for t in texts if t]
  total = sum(len(t) for t in texts)
  stride = max(1, -(-total // _MAX_TRAINING_CHARS))
  for text in texts[::stride]:
    for line in text.split("\n"):
      if line.strip():
        yield line.encode("utf-8")[:_MAX_LINE_BYTES].decode("utf-8", errors="ignore")


def _character_coverage(lines: list[str], max_chars: int) -> float:
  """SentencePiece's character_coverage, lowered so that at most `max_chars`
  characters need their own piece.

  SentencePiece fails when the characters covering 99.95% of the text do not fit
  in the vocabulary, which happens for small vocabularies on text with many
  symbols. Byte fallback still encodes the rarer characters, so covering less
  loses nothing but a little compression.
  """
  counts = sorted(collections.Counter("".join(lines)).values(), reverse=True)
  total = sum(counts)
  if len(counts) <= max_chars or not total:
    return _DEFAULT_COVERAGE
  covered = sum(counts[:max_chars]) / total
  return min(_DEFAULT_COVERAGE, max(_MIN_COVERAGE, covered - 1e-6))


def _training_error(error: RuntimeError, vocab_size: int) -> ValueError:
  """SentencePiece's multi-line check failures as one line saying what to change."""
  text = str(error)
  needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", text)
  if needed:
    return ValueError(
        f"config.model.vocab_size={vocab_size} is too small for this text: its specials and "
        f"most common characters alone need {needed.group(1)} pieces; raise it")
  if "too high" in text.lower():
    return ValueError(f"the training text is too small to learn config.model.vocab_size="
                      f"{vocab_size} pieces; lower it or use more data")
  return ValueError(f"training a tokenizer of config.model.vocab_size={vocab_size} "
                    f"failed: {_last_line(error)}")


def min_vocab_size(num_sentinels: int) -> int:
  """Pieces reserved before any learned one: 4 specials, mask, sentinels, bytes."""
  return 5 + num_sentinels + _NUM_BYTE_PIECES


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | os.PathLike,
                    num_sentinels: int) -> Tokenizer:
  """Trains a BPE SentencePiece model of exactly `vocab_size` pieces into `path`."""
  reserved = min_vocab_size(num_sentinels)
  if vocab_size <= reserved:
    raise ValueError(
        f"config.model.vocab_size={vocab_size} leaves no room for learned pieces: "
        f"{reserved} ids are reserved (4 specials, <mask>, {num_sentinels} sentinels, "
        f"{_NUM_BYTE_PIECES} bytes); raise it or lower config.data.num_sentinels")
  lines = list(_training_lines(texts))
  # Leave a quarter of the learnable pieces for merges.
  coverage = _character_coverage(lines, max(1, (vocab_size - reserved) * 3 // 4))
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, character_coverage=coverage,
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        # Exactly vocab_size pieces or an error: the embedding table has that size.
        hard_vocab_limit=True,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        user_defined_symbols=[MASK_PIECE] + [sentinel_piece(i) for i in range(num_sentinels)],
        # Lossless: keep every character and every run of spaces as written.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=_MAX_LINE_BYTES,
        # Fixed: the learned pieces depend on the thread count (1 and 2 differ).
        num_threads=2, shuffle_input_sentence=False, minloglevel=2)
  except RuntimeError as e:
    raise _training_error(e, vocab_size) from None
  tokenizer = Tokenizer(model.getvalue(), str(path))
  if tokenizer.vocab_size != vocab_size:  # hard_vocab_limit should make this impossible
    raise ValueError(f"trained tokenizer has {tokenizer.vocab_size} pieces, "
                     f"not config.model.vocab_size={vocab_size}")
  cache.atomic_write(path, lambda f: f.write(tokenizer.model_proto))
  return tokenizer


def _copy(src: str | os.PathLike, dst: pathlib.Path):
  cache.atomic_write(dst, lambda f: f.write(pathlib.Path(src).read_bytes()))


def _cache_path(data_cfg, vocab_size: int) -> pathlib.Path:
  key = cache.fingerprint(
      _RECIPE_VERSION, spm.__version__,
      sources.source_fingerprint(data_cfg, data_cfg.train_split),
      vocab_size, data_cfg.num_sentinels, data_cfg.max_documents,
      sys.version_info[:3])
  return cache.cache_dir("tokenizers") / f"{key}.model"


def get_tokenizer(data_cfg, vocab_size: int, workdir: str | os.PathLike) -> Tokenizer:
  """The run's tokenizer, saved as `workdir/tokenizer.model` (see `tokenizer_source`),
  so generation, evaluation and fine-tuning later need only the workdir."""
  source = tokenizer_source(data_cfg, vocab_size, workdir)
  install_tokenizer(source, workdir)
  return Tokenizer.load(pathlib.Path(workdir) / TOKENIZER_FILE)


def tokenizer_source(data_cfg, vocab_size: int, workdir: str | os.PathLike) -> pathlib.Path:
  """The file of the run's tokenizer: the workdir's, else `tokenizer_path`, else one
  trained on the data (cached). Writes nothing into `workdir`."""
  target = pathlib.Path(workdir) / TOKENIZER_FILE
  if target.exists():
    check_vocab_size(Tokenizer.load(target), vocab_size, f"the workdir's tokenizer {target}")
    return target
  if data_cfg.tokenizer_path:
    if not os.path.exists(data_cfg.tokenizer_path):
      raise ValueError(f"config.data.tokenizer_path={data_cfg.tokenizer_path!r}: no such file")
    check_vocab_size(Tokenizer.load(data_cfg.tokenizer_path), vocab_size,
                     f"config.data.tokenizer_path={data_cfg.tokenizer_path!r}")
    return pathlib.Path(data_cfg.tokenizer_path)
  cached = _cache_path(data_cfg, vocab_size)
  if cached.exists() and not _cached_tokenizer_ok(cached, vocab_size):
    cached.unlink(missing_ok=True)
  if not cached.exists():
    documents = sources.load_documents(data_cfg, data_cfg.train_split,
                                       max_chars=_MAX_TRAINING_CHARS)
    train_tokenizer(documents, vocab_size, cached, data_cfg.num_sentinels)
  return cached


def _cached_tokenizer_ok(path: pathlib.Path, vocab_size: int) -> bool:
  """Whether the cached model loads with `vocab_size` pieces; else it is reported."""
  try:
    pieces = Tokenizer.load(path).vocab_size
  except ValueError as e:
    cache.report_corrupt(path, str(e).split(": ", 1)[-1])
    return False
  if pieces != vocab_size:
    cache.report_corrupt(path, f"{pieces} pieces, not {vocab_size}")
  return pieces == vocab_size


def install_tokenizer(source: str | os.PathLike, workdir: str | os.PathLike) -> None:
  """Copies the tokenizer file into the workdir (atomically) unless it is already there."""
  target = pathlib.Path(workdir) / TOKENIZER_FILE
  if pathlib.Path(source).resolve() != target.resolve():
    _copy(source, target)
