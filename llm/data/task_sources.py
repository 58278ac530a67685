"""Tasks from real datasets: TFDS datasets by name, and JSONL files.

Nothing is downloaded unless asked (`download=True`): a TFDS dataset that is not
prepared locally fails at once with a message saying what to set (see
`llm.data.tfds_source`). Known datasets come with a template and a metric; a
classification dataset's integer labels become label words.

`load_task("topic")` is a generated task, `load_task("tfds:glue/sst2")` a TFDS one.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Mapping, Optional

import numpy as np

from llm.config import ConfigError
from llm.data import tfds_source
from llm.data.sources import DataError, jsonl_values
from llm.data.tasks import Task, get_task
from llm.data.templates import Template

TFDS_PREFIX = "tfds:"


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  """How a TFDS dataset becomes a task: its template, metric, splits (task split ->
  TFDS split) and, for classification, the words of its integer labels."""

  template: Template
  metric: str
  splits: Mapping[str, str]
  labels: tuple[str, ...] = ()
  label_field: str = "label"


_ALL_SPLITS = {"train": "train", "validation": "validation", "test": "test"}

TFDS_TASKS: dict[str, TfdsSpec] = {
    "samsum": TfdsSpec(Template("Summarize the dialogue:\n{dialogue}\nSummary:", " {summary}",
                                name="samsum"), "rouge", _ALL_SPLITS),
    "cnn_dailymail": TfdsSpec(Template("Article: {article}\nSummary:", " {highlights}",
                                       name="cnn_dailymail"), "rouge", _ALL_SPLITS),
    # GLUE's test labels are hidden: its validation split is the one to score.
    "glue/sst2": TfdsSpec(Template("Review: {sentence}\nSentiment:", " {label}", name="sst2"),
                          "accuracy", {"train": "train", "validation": "validation"},
                          labels=("negative", "positive")),
}
_WMT = re.compile(r"^wmt\d\d_translate/([a-z]{2})-([a-z]{2})$")
_LANGUAGES = {"cs": "Czech", "de": "German", "en": "English", "fi": "Finnish", "fr": "French",
              "gu": "Gujarati", "hi": "Hindi", "kk": "Kazakh", "lt": "Lithuanian",
              "lv": "Latvian", "ro": "Romanian", "ru": "Russian", "tr": "Turkish",
              "zh": "Chinese", "et": "Estonian"}


def tfds_spec(name: str) -> TfdsSpec:
  """The spec of a known TFDS dataset; WMT pairs `wmtYY_translate/xx-yy` translate xx->yy."""
  if name in TFDS_TASKS:
    return TFDS_TASKS[name]
  match = _WMT.match(name)
  if match:
    src, tgt = match.groups()
    words = (_LANGUAGES.get(src, src), _LANGUAGES.get(tgt, tgt))
    return TfdsSpec(Template(f"Translate {words[0]} to {words[1]}: {{{src}}}\n{words[1]}:",
                             f" {{{tgt}}}", name=name), "bleu", _ALL_SPLITS)
  raise ConfigError(f"TFDS task {name!r} is unknown; known: {', '.join(TFDS_TASKS)} and "
                    "wmtYY_translate/xx-yy; for others build a Task from tfds_records")


def _plain(value: Any) -> Any:
  """A TFDS feature value as Python: bytes decoded, numpy scalars unwrapped."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, np.generic):
    return value.item()
  return value


def tfds_records(name: str, split: str, fields, *, data_dir: Optional[str] = None,
                 download: bool = False, limit: Optional[int] = None) -> list[dict]:
  """Records of `split` of TFDS dataset `name`, holding only `fields` (as Python values)."""
  records = []
  for example in tfds_source.load_examples(name, split, data_dir=data_dir, download=download,
                                           limit=limit):
    missing = [f for f in fields if f not in example]
    if missing:
      raise DataError(f"TFDS dataset {name!r} has no feature {missing[0]!r} (features: "
                      f"{', '.join(sorted(example))}); fix the task's template")
    records.append({f: _plain(example[f]) for f in fields})
  return records


def _labelled(records: list[dict], spec: TfdsSpec, name: str) -> list[dict]:
  """Integer labels as words; unlabelled examples (label -1) dropped."""
  out = []
  for record in records:
    label = record[spec.label_field]
    if isinstance(label, int) and label < 0:
      continue
    if not isinstance(label, int) or label >= len(spec.labels):
      raise DataError(f"TFDS dataset {name!r}: label {label!r} is not an index into "
                      f"{spec.labels}")
    out.append({**record, spec.label_field: spec.labels[label]})
  return out


def tfds_task(name: str, *, data_dir: Optional[str] = None, download: bool = False,
              limit: Optional[int] = None) -> Task:
  """A known TFDS dataset as a Task (at most `limit` records per split)."""
  spec = tfds_spec(name)
  splits = {}
  for split, tfds_split in spec.splits.items():
    records = tfds_records(name, tfds_split, spec.template.fields, data_dir=data_dir,
                           download=download, limit=limit)
    splits[split] = tuple(_labelled(records, spec, name) if spec.labels else records)
  return Task(name, splits, spec.template, spec.metric, labels=spec.labels,
              label_field=spec.label_field)


def _read_jsonl(path: str, encoding: str) -> list[dict]:
  if not pathlib.Path(path).is_file():
    raise DataError(f"JSONL task file {path!r}: no such file; check the path")
  records = []
  for number, record in jsonl_values(path, encoding):
    if not isinstance(record, dict):
      raise DataError(f"{path}:{number}: a {type(record).__name__}, not a JSON object")
    records.append(record)
  return records


def jsonl_task(name: str, files: Mapping[str, str], template: Template, metric: str,
               labels: tuple[str, ...] = (), label_field: str = "label",
               encoding: str = "utf-8") -> Task:
  """A Task from JSONL files, one per split ({"train": path, "test": path, ...}); the
  template names the fields each record must have (checked on every record)."""
  splits = {split: tuple(_read_jsonl(path, encoding)) for split, path in files.items()}
  for split, records in splits.items():
    for record in records:
      template.check(record)
      if labels and record[label_field] not in labels:
        raise DataError(f"{files[split]}: label {record[label_field]!r} is not one of "
                        f"{list(labels)}")
  return Task(name, splits, template, metric, labels=labels, label_field=label_field)


def load_task(spec: str, *, seed: int = 0, data_dir: Optional[str] = None,
              limit: Optional[int] = None) -> Task:
  """A task by name: "tfds:NAME" (a known TFDS dataset, never downloaded), a generated
  one of `llm.data.tasks.TASKS` (deterministic by `seed`), or "review", the
  demonstrations of the generated preference task (`llm.data.preferences`)."""
  if spec.startswith(TFDS_PREFIX):
    return tfds_task(spec[len(TFDS_PREFIX):], data_dir=data_dir, limit=limit)
  if spec == "review":  # its prompts repeat (16 items), unlike the suite's
    from llm.data.preferences import review_task
    return review_task(seed)
  return get_task(spec, seed)
