"""Tasks: records with splits, a default template, a metric; and an offline suite.

The suite is generated here from vocabulary written in this file (no third-party
text), deterministically from a seed, with known answers and disjoint
train / validation / test splits (no two records share their inputs). Each task is
learnable by a tiny model from a few hundred fine-tuning steps, and an untuned
model scores far below what is achievable:

  topic      classify a sentence by the topic of its nouns: 4 labels (accuracy by
             label log-likelihood; chance 25%)
  summary    extractive summarisation: the article's lead sentence (ROUGE)
  translate  word-by-word into a cipher language that rotates vowels (BLEU)
  facts      read three facts, answer a question about one of them (exact match)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from llm.config import ConfigError
from llm.data.templates import Template

METRICS = ("accuracy", "rouge", "bleu", "exact_match")
SPLITS = ("train", "validation", "test")
SPLIT_SIZES = {"train": 2000, "validation": 200, "test": 200}


@dataclasses.dataclass(frozen=True)
class Task:
  """Records by split, the template that makes (prompt, completion) pairs, the metric,
  and for classification (metric "accuracy") the label words, found in `label_field`."""

  name: str
  splits: Mapping[str, Sequence[dict]]
  template: Template
  metric: str
  labels: tuple[str, ...] = ()
  label_field: str = "label"

  def __post_init__(self):
    if self.metric not in METRICS:
      raise ConfigError(f"task {self.name!r}: metric={self.metric!r}; use one of {METRICS}")
    if (self.metric == "accuracy") != bool(self.labels):
      raise ConfigError(f"task {self.name!r}: metric 'accuracy' (label scoring) and labels "
                        "go together; give both or neither")
    if self.labels and self.label_field not in self.template.fields:
      raise ConfigError(f"task {self.name!r}: the template does not use label_field="
                        f"{self.label_field!r}; fields: {', '.join(self.template.fields)}")

  def records(self, split: str) -> Sequence[dict]:
    if split not in self.splits:
      raise ConfigError(f"task {self.name!r} has no split {split!r}; it has: "
                        f"{', '.join(self.splits)}")
    return self.splits[split]

  def pairs(self, split: str) -> list[tuple[str, str]]:
    return [self.template.apply(record) for record in self.records(split)]

  def label_completions(self, record: Mapping) -> list[str]:
    """The completion each label would give `record`, in label order."""
    return [self.template.apply({**record, self.label_field: label})[1] for label in self.labels]


def _unique_records(make: Callable[[np.random.Generator], dict], rng: np.random.Generator,
                    count: int, key_fields: Sequence[str]) -> list[dict]:
  """`count` records of `make` whose `key_fields` all differ."""
  seen, records = set(), []
  for _ in range(50 * count):
    record = make(rng)
    key = tuple(record[f] for f in key_fields)
    if key not in seen:
      seen.add(key)
      records.append(record)
      if len(records) == count:
        return records
  raise ConfigError(f"only {len(records)} distinct records of {count} wanted; lower the sizes")


def _split(records: list[dict]) -> dict[str, tuple[dict, ...]]:
  out, start = {}, 0
  for split in SPLITS:
    out[split] = tuple(records[start:start + SPLIT_SIZES[split]])
    start += SPLIT_SIZES[split]
  return out


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
  return words[int(rng.integers(len(words)))]


# --- topic: classification ------------------------------------------------------

TOPIC_NOUNS = {
    "animal": ("horse", "rabbit", "tiger", "sparrow", "goat", "whale", "beetle", "wolf",
               "donkey", "owl"),
    "food": ("bread", "cheese", "soup", "apple", "noodles", "pie", "rice", "carrot",
             "pancake", "onion"),
    "sport": ("tennis", "hockey", "football", "rowing", "boxing", "golf", "cycling",
              "chess", "skiing", "baseball"),
    "weather": ("rain", "snow", "fog", "thunder", "wind", "hail", "sunshine", "frost",
                "storm", "drizzle"),
}
_SUBJECTS = ("my sister", "the old man", "a child", "our teacher", "the neighbour",
             "my friend", "the doctor", "a stranger", "the pilot", "her uncle")
_TOPIC_VERBS = ("talked about", "thought about", "wrote about", "asked about",
                "dreamed about", "read about", "laughed about", "sang about")
_TIMES = ("today", "last week", "at night", "in the morning", "after lunch", "on sunday",
          "all day", "yesterday")


def _topic_record(rng):
  label = _pick(rng, tuple(TOPIC_NOUNS))
  first, second = rng.choice(TOPIC_NOUNS[label], 2, replace=False)
  text = (f"{_pick(rng, _SUBJECTS)} {_pick(rng, _TOPIC_VERBS)} the {first} and the {second} "
          f"{_pick(rng, _TIMES)}")
  return {"text": text, "label": label}


def topic_task(seed: int = 0) -> Task:
  rng = np.random.default_rng([seed, 1])
  records = _unique_records(_topic_record, rng, sum(SPLIT_SIZES.values()), ["text"])
  return Task("topic", _split(records), Template("Sentence: {text}\nTopic:", " {label}",
                                                 name="topic"),
              "accuracy", labels=tuple(TOPIC_NOUNS))


# --- summary: extractive summarisation ------------------------------------------

_NAMES = ("Mara", "Tobin", "Elsa", "Rufus", "Nadia", "Osric", "Lena", "Pavel", "Ines",
          "Hugo", "Greta", "Milo")
_DEEDS = ("sold", "painted", "repaired", "found", "bought", "carried", "hid", "counted")
_COUNTS = ("two", "three", "four", "five", "six", "seven", "eight", "nine")
_THINGS = ("lamps", "boats", "chairs", "clocks", "baskets", "kites", "drums", "bottles",
           "ladders", "maps")
_PLACES = ("the harbor", "the market", "the old mill", "the village", "the garden",
           "the station", "the school", "the bakery")
_FILLERS = ("The weather was {adj} that day.", "Many people came to watch.",
            "Nobody had expected it.", "It took {count} hours in all.",
            "The news spread quickly.", "Some of them were {adj}.",
            "A reporter wrote it down.", "Later everyone went home.")
_ADJECTIVES = ("calm", "cold", "bright", "grey", "warm", "strange", "quiet", "wet")


def _sentence(rng):
  return (f"{_pick(rng, _NAMES)} {_pick(rng, _DEEDS)} {_pick(rng, _COUNTS)} "
          f"{_pick(rng, _THINGS)} at {_pick(rng, _PLACES)}.")


def _summary_record(rng):
  lead = _sentence(rng)
  fillers = [_FILLERS[i].format(adj=_pick(rng, _ADJECTIVES), count=_pick(rng, _COUNTS))
             for i in rng.choice(len(_FILLERS), 2, replace=False)]
  return {"article": " ".join([lead, *fillers]), "summary": lead}


def summary_task(seed: int = 0) -> Task:
  rng = np.random.default_rng([seed, 2])
  records = _unique_records(_summary_record, rng, sum(SPLIT_SIZES.values()), ["article"])
  return Task("summary", _split(records),
              Template("Article: {article}\nSummary:", " {summary}", name="summary"), "rouge")


# --- translate: a string transformation -----------------------------------------

_VOWEL_ROTATION = str.maketrans("aeiou", "eioua")
_DETERMINERS = ("the", "a", "one", "my", "your", "this")
_TRANSLATE_ADJECTIVES = ("red", "big", "small", "happy", "slow", "green", "tall", "soft")
_TRANSLATE_NOUNS = ("cat", "dog", "house", "tree", "bird", "man", "woman", "car", "river",
                    "book")
_TRANSLATE_VERBS = ("sees", "likes", "follows", "finds", "visits", "paints", "hears", "wants")


def cipher(text: str) -> str:
  """The translate task's target language: every vowel moves to the next (a->e ... u->a)."""
  return text.translate(_VOWEL_ROTATION)


def _translate_record(rng):
  words = [_pick(rng, _DETERMINERS), _pick(rng, _TRANSLATE_ADJECTIVES),
           _pick(rng, _TRANSLATE_NOUNS), _pick(rng, _TRANSLATE_VERBS),
           _pick(rng, _DETERMINERS), _pick(rng, _TRANSLATE_NOUNS)]
  source = " ".join(words)
  return {"source": source, "target": cipher(source)}


def translate_task(seed: int = 0) -> Task:
  rng = np.random.default_rng([seed, 3])
  records = _unique_records(_translate_record, rng, sum(SPLIT_SIZES.values()), ["source"])
  return Task("translate", _split(records),
              Template("English: {source}\nCipher:", " {target}", name="translate"), "bleu")


# --- facts: question answering ---------------------------------------------------

_OBJECTS = ("ball", "cup", "hat", "door", "kite", "shoe", "box", "pen", "bag", "car",
            "bowl", "coat")
_COLORS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown")


def _facts_record(rng):
  objects = rng.choice(_OBJECTS, 3, replace=False)
  colors = rng.choice(_COLORS, 3, replace=False)
  context = " ".join(f"The {o} is {c}." for o, c in zip(objects, colors))
  asked = int(rng.integers(3))
  return {"context": context, "question": f"What color is the {objects[asked]}?",
          "answer": str(colors[asked])}


def facts_task(seed: int = 0) -> Task:
  rng = np.random.default_rng([seed, 4])
  records = _unique_records(_facts_record, rng, sum(SPLIT_SIZES.values()),
                            ["context", "question"])
  return Task("facts", _split(records),
              Template("{context}\nQuestion: {question}\nAnswer:", " {answer}", name="facts"),
              "exact_match")


TASKS: dict[str, Callable[[int], Task]] = {
    "topic": topic_task, "summary": summary_task, "translate": translate_task,
    "facts": facts_task,
}


def get_task(name: str, seed: int = 0) -> Task:
  """A generated task of the suite by name; the same seed gives the same records."""
  if name not in TASKS:
    raise ConfigError(f"task {name!r} is unknown; generated tasks: {', '.join(TASKS)} "
                      "(TFDS / JSONL tasks: llm.data.task_sources)")
  return TASKS[name](seed)
