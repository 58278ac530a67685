"""Documents from a TFDS dataset, read without TensorFlow and without the network.

Without TensorFlow, TFDS reads only random-access formats (array_record,
parquet) through `builder.as_data_source`. A dataset prepared in the default
tfrecord format needs TensorFlow, which is used when it is installed.

Nothing is downloaded unless config.data.tfds_download is true: the builder is
made with `try_gcs=False`, namespaced (community / Hugging Face) datasets are
opened from local files only, and a dataset that is not prepared fails at once
with a message that says what to set.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator, Optional

from llm.data.sources import DataError

_READ_CHUNK = 1024


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError("config.data.source='tfds:...' needs tensorflow-datasets and "
                    "array_record: pip install tensorflow-datasets array_record") from None
  return tfds


def _not_prepared(name: str, data_dir: Optional[str]) -> DataError:
  where = data_dir or "the default TFDS data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
  return DataError(
      f"TFDS dataset {name!r} is not prepared in {where}; set config.data.data_dir to "
      "where it is, or config.data.tfds_download=True to download and prepare it")


# Builders of the older dataset families are imported lazily by TFDS, so
# `tfds.builder` does not know them (e.g. wikipedia, c4) until they are imported.
_LEGACY_TEXT_FAMILIES = ("text", "summarization", "translate", "question_answering",
                         "text_simplification")


def _register_legacy_text_builders():
  for family in _LEGACY_TEXT_FAMILIES:
    try:
      importlib.import_module(f"tensorflow_datasets.{family}")
    except Exception:  # pylint: disable=broad-except
      pass  # a family that needs missing extras only matters if asked for


def _builder(tfds, name: str, data_dir: Optional[str], download: bool):
  """The dataset's builder, made without touching the network unless `download`."""
  # pylint: disable-next=import-outside-toplevel
  from tensorflow_datasets.core import naming, read_only_builder, registered
  if naming.parse_builder_name_kwargs(name)[0].namespace and not download:
    # Community / Hugging Face builders query remote registries on creation.
    try:
      return read_only_builder.builder_from_files(name, data_dir=data_dir)
    except registered.DatasetNotFoundError:
      raise _not_prepared(name, data_dir) from None
  for attempt in range(2):
    try:
      return tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except registered.DatasetNotFoundError:
      if attempt == 0:
        _register_legacy_text_builders()
        continue
      raise DataError(f"config.data.source='tfds:{name}': TFDS has no builder for it and it is "
                      f"not prepared in data_dir={data_dir!r}; check the name or set "
                      "config.data.data_dir to where it is prepared") from None
    except Exception as e:  # builders validate names / configs / versions eagerly
      raise DataError(f"config.data.source='tfds:{name}': {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _split_error(name: str, split: str, builder, error: Exception) -> DataError:
  try:
    known = ", ".join(sorted(builder.info.splits))
  except Exception:  # pylint: disable=broad-except
    known = ""
  hint = f" (it has: {known})" if known else ""
  return DataError(f"TFDS dataset {name!r} has no split {split!r}{hint}; set "
                   f"config.data.train_split / eval_split ({_first_line(error)})")


def _source(tfds, name: str, split: str, builder, data_dir, download: bool):
  """A random-access source for `split`, or a list via tf.data if only tfrecord."""
  if download and not builder.is_prepared():
    # array_record: the format TFDS can read back without TensorFlow.
    builder.download_and_prepare(file_format="array_record")
  try:
    # Tried before checking is_prepared(): tfds.testing.mock_data serves
    # as_data_source for datasets that have no files at all.
    return builder.as_data_source(split=split)
  except NotImplementedError:
    if not builder.is_prepared():
      raise _not_prepared(name, data_dir) from None
    return _tf_dataset(tfds, name, split, builder)
  except (ValueError, KeyError) as e:
    if not builder.is_prepared():
      raise _not_prepared(name, data_dir) from None
    raise _split_error(name, split, builder, e) from None


def _tf_dataset(tfds, name: str, split: str, builder):
  """Examples of a tfrecord-prepared dataset, which only TensorFlow can read."""
  try:
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise DataError(
        f"TFDS dataset {name!r} is prepared as {builder.info.file_format.value}, which needs "
        "TensorFlow to read; pip install tensorflow, or re-prepare it as array_record "
        "(config.data.tfds_download=True with a new config.data.data_dir)") from None
  return tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))


def _read_examples(source, limit: Optional[int]):
  """Yields examples in order, in chunks where the source supports batched reads."""
  if not hasattr(source, "__len__"):  # a tf.data iterator
    for i, example in enumerate(source):
      if limit is not None and i >= limit:
        return
      yield example
    return
  count = len(source) if limit is None else min(limit, len(source))
  for start in range(0, count, _READ_CHUNK):
    keys = list(range(start, min(start + _READ_CHUNK, count)))
    try:
      chunk = source.__getitems__(keys)
    except (AttributeError, TypeError):  # sources without (working) batched reads
      chunk = [source[k] for k in keys]
    yield from chunk


def example_text(example: Any, text_key: str, name: str) -> str:
  """The text of one example under `text_key`, decoded; a DataError if it has none."""
  if not isinstance(example, dict) or text_key not in example:
    keys = ", ".join(sorted(example)) if isinstance(example, dict) else type(example).__name__
    raise DataError(f"TFDS dataset {name!r} has no feature config.data.text_key={text_key!r} "
                    f"(features: {keys})")
  value = example[text_key]
  if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, str):
    return value
  raise DataError(f"TFDS dataset {name!r}: feature {text_key!r} is not text "
                  f"({type(value).__name__}); set config.data.text_key")


def load_examples(name: str, split: str, *, data_dir: Optional[str], download: bool,
                  limit: Optional[int]) -> Iterator[Any]:
  """The examples (feature dicts) of `split` of TFDS dataset `name`, in order: at most
  `limit` of them. Fails at once, before yielding, if the dataset is not there."""
  tfds = _import_tfds()
  builder = _builder(tfds, name, data_dir, download)
  return _read_examples(_source(tfds, name, split, builder, data_dir, download), limit)


def random_access_source(name: str, split: str, *, data_dir: Optional[str],
                         download: bool):
  """`split` as a random-access source (array_record, parquet), for streaming
  (`llm.data.streaming`); a tfrecord-prepared dataset is a DataError saying what to do."""
  tfds = _import_tfds()
  builder = _builder(tfds, name, data_dir, download)
  source = _source(tfds, name, split, builder, data_dir, download)
  if not hasattr(source, "__len__"):
    raise DataError(f"TFDS dataset {name!r} is prepared as {builder.info.file_format.value}; "
                    "config.data.streaming=True reads array_record: re-prepare it "
                    "(config.data.tfds_download=True with a new config.data.data_dir) or set "
                    "config.data.streaming=False")
  return source


def load(name: str, split: str, *, data_dir: Optional[str], download: bool,
         text_key: str, limit: Optional[int], max_chars: Optional[int] = None) -> list[str]:
  """The texts of `split` of TFDS dataset `name`: at most `limit` of them, and
  no more once `max_chars` characters are read."""
  texts, total = [], 0
  for example in load_examples(name, split, data_dir=data_dir, download=download,
                               limit=limit):
    texts.append(example_text(example, text_key, name))
    total += len(texts[-1])
    if max_chars is not None and total >= max_chars:
      break
  return texts
