"""Prompt templates: records -> (prompt, completion); zero-, one- and few-shot prompts.

A template is two `str.format` strings over a record's fields. A k-shot prompt is k
solved examples (prompt + completion), each followed by `separator`, then the
query's prompt; the shots are a deterministic function of the seed and never the
query itself.
"""

from __future__ import annotations

import dataclasses
import itertools
import string
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from llm.config import ConfigError

SHOT_SEPARATOR = "\n\n"


def _field_names(format_string: str) -> tuple[str, ...]:
  """Top-level field names of a format string ("{a.b}" and "{a[0]}" name "a")."""
  names = []
  try:
    parsed = list(string.Formatter().parse(format_string))
  except ValueError as e:
    raise ConfigError(f"template {format_string!r}: {e}; fix the format string") from None
  for _, field, _, _ in parsed:
    if field is None:
      continue
    if field == "" or field.isdigit():
      raise ConfigError(f"template {format_string!r}: positional fields are not allowed; "
                        "name every field, e.g. {text}")
    root = field.split(".", 1)[0].split("[", 1)[0]
    if root not in names:
      names.append(root)
  return tuple(names)


@dataclasses.dataclass(frozen=True)
class Template:
  """`prompt` and `completion` are format strings over record fields, e.g.
  Template("Review: {text}\\nSentiment:", " {label}")."""

  prompt: str
  completion: str
  name: str = ""

  def __post_init__(self):
    _ = self.fields  # a malformed format string fails here, not at the first record

  @property
  def fields(self) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_field_names(self.prompt) + _field_names(self.completion)))

  def check(self, record: Mapping) -> None:
    """A one-line ConfigError unless `record` has every field the template names."""
    for field in self.fields:
      if field not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise ConfigError(f"template {self.name or self.prompt!r} uses field {field!r} but the "
                          f"record has only: {keys}; fix the template or the record fields")

  def apply(self, record: Mapping) -> tuple[str, str]:
    """(prompt, completion) of one record."""
    self.check(record)
    return self.prompt.format(**record), self.completion.format(**record)


def choose_shots(pool: Sequence[Mapping], k: int, seed: Union[int, Sequence[int]],
                 query: Optional[Mapping] = None) -> list[Mapping]:
  """k records of `pool` in an order fixed by `seed` (an int or a sequence of ints, e.g.
  [seed, query index] for shots that vary per query), skipping any equal to `query`."""
  if k < 0:
    raise ConfigError(f"k_shot={k}: must be >= 0")
  order = np.random.default_rng(seed).permutation(len(pool))
  others = (pool[i] for i in order if query is None or pool[i] != query)
  shots = list(itertools.islice(others, k))
  if len(shots) < k:
    raise ConfigError(f"k_shot={k} needs {k} solved examples but the pool has only "
                      f"{len(shots)} (other than the query); lower k_shot")
  return shots


def shot_prompt(template: Template, query: Mapping, shots: Sequence[Mapping],
                separator: str = SHOT_SEPARATOR) -> tuple[str, str]:
  """(prompt, completion): the solved `shots` then the query's prompt; zero-shot if none."""
  context = "".join("".join(template.apply(shot)) + separator for shot in shots)
  prompt, completion = template.apply(query)
  return context + prompt, completion


def few_shot(template: Template, query: Mapping, pool: Sequence[Mapping], k: int, *,
             seed: Union[int, Sequence[int]], tokenizer, max_len: int, reserve: int = 0,
             separator: str = SHOT_SEPARATOR) -> tuple[str, str]:
  """The k-shot (prompt, completion) of `query`, with shots drawn from `pool`.

  The prompt's tokens plus `reserve` (room kept for the completion and special
  tokens) must fit `max_len`; otherwise a one-line ConfigError gives the largest k
  that fits.
  """
  shots = choose_shots(pool, k, seed, query)
  prompt, completion = shot_prompt(template, query, shots, separator)
  budget = max_len - reserve
  needed = len(tokenizer.encode(prompt))
  if needed <= budget:
    return prompt, completion
  fits = next((j for j in range(k - 1, -1, -1)
               if len(tokenizer.encode(shot_prompt(template, query, shots[:j], separator)[0]))
               <= budget), None)
  hint = (f"the largest k that fits is {fits}" if fits is not None
          else "even the query alone does not fit")
  raise ConfigError(f"k_shot={k}: {k} examples + the query take {needed} tokens (+{reserve} "
                    f"reserved) but the context window is {max_len} (model.max_len); {hint}")
