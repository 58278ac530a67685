"""Preference data: human feedback records -> (prompt, chosen, rejected) pairs, and a
generated preference task whose hidden rule says how good any completion truly is.

Records (JSONL, one per line), each with a "prompt":

  ranking   {"completions": [c1, ..., ck], "ranks": [r1, ..., rk]}  (1 = best, no ties)
            -> its k(k-1)/2 pairs, every better completion over every worse one
  pairwise  {"chosen": c, "rejected": c'}
  thumbs    {"completion": c, "thumbs": "up" | "down"}
            -> every thumbed-up completion of a prompt over every thumbed-down one

The generated task ("review") asks for a review of an item; a completion is
" it is A and B." with one to three adjectives. The hidden rule (`true_score`): a
well-formed completion (1-3 distinct known adjectives, that exact format) scores
(#positive - #negative adjectives) in [-3, 3], anything else -1.5. A noisy labeler ranks
four completions per prompt by true score + Gaussian noise, as annotators disagree.
The labeler never shows a repeated adjective, more than three of them, or text in
another format, so a reward model learnt from its rankings does not know they are bad:
a policy optimised against that model without restraint can exploit it, and the true
score says when it does.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

from llm.config import ConfigError
from llm.data.tasks import SPLITS, Task
from llm.data.templates import Template


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  prompt: str
  chosen: str
  rejected: str


# --- records -> pairs -------------------------------------------------------------

def _field(record: Mapping, name: str, kind, where: str):
  if name not in record:
    raise ConfigError(f"{where}: missing field {name!r} (has: {', '.join(sorted(record))})")
  value = record[name]
  if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
    raise ConfigError(f"{where}: field {name!r} must be a {getattr(kind, '__name__', kind)}, "
                      f"got {value!r:.60}")
  return value


def ranking_to_pairs(prompt: str, completions: Sequence[str], ranks: Sequence[int],
                     where: str = "ranking") -> list[PreferencePair]:
  """The k(k-1)/2 (better, worse) pairs of a strict ranking (rank 1 = best)."""
  if len(completions) < 2:
    raise ConfigError(f"{where}: a ranking needs at least two completions, got "
                      f"{len(completions)}; use a thumbs record for a single one")
  if len(ranks) != len(completions):
    raise ConfigError(f"{where}: field 'ranks' has {len(ranks)} entries for "
                      f"{len(completions)} completions; give one rank per completion")
  if any(not isinstance(r, int) or isinstance(r, bool) for r in ranks):
    raise ConfigError(f"{where}: field 'ranks' must hold integers (1 = best), got {list(ranks)}")
  tied = sorted({r for r in ranks if list(ranks).count(r) > 1})
  if tied:
    raise ConfigError(f"{where}: ranks {tied} are tied; a ranking needs a strict order "
                      "(give distinct ranks, or write the untied pairs as pairwise records)")
  order = [completions[i] for i in np.argsort(ranks, kind="stable")]
  return [PreferencePair(prompt, better, worse)
          for better, worse in itertools.combinations(order, 2)]


def record_kind(record: Mapping, where: str) -> str:
  kinds = [k for k, key in (("ranking", "completions"), ("pairwise", "chosen"),
                            ("thumbs", "thumbs")) if key in record]
  if len(kinds) != 1:
    raise ConfigError(f"{where}: cannot tell the record kind; give exactly one of "
                      "'completions' + 'ranks' (ranking), 'chosen' + 'rejected' (pairwise), "
                      "'completion' + 'thumbs' (thumbs)")
  return kinds[0]


def records_to_pairs(records: Iterable[Mapping], source: str = "records") -> list[PreferencePair]:
  """Pairs of ranking, pairwise and thumbs records, in record order (thumbs pairs come
  after the others, grouped by prompt in first-seen order)."""
  pairs, thumbs = [], {}
  for index, record in enumerate(records, 1):
    where = f"{source} record {index}"
    if not isinstance(record, Mapping):
      raise ConfigError(f"{where}: expected a JSON object, got {record!r:.60}")
    prompt = _field(record, "prompt", str, where)
    kind = record_kind(record, where)
    if kind == "ranking":
      pairs += ranking_to_pairs(prompt, _field(record, "completions", list, where),
                                _field(record, "ranks", list, where), where)
    elif kind == "pairwise":
      pairs.append(PreferencePair(prompt, _field(record, "chosen", str, where),
                                  _field(record, "rejected", str, where)))
    else:
      vote = _field(record, "thumbs", str, where)
      if vote not in ("up", "down"):
        raise ConfigError(f"{where}: field 'thumbs' must be 'up' or 'down', got {vote!r}")
      ups, downs = thumbs.setdefault(prompt, ([], []))
      (ups if vote == "up" else downs).append(_field(record, "completion", str, where))
  for prompt, (ups, downs) in thumbs.items():
    pairs += [PreferencePair(prompt, up, down) for up in ups for down in downs]
  return pairs


def read_jsonl(path: str) -> list[dict]:
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except OSError as e:
    raise ConfigError(f"config.align.preferences=jsonl:{path}: cannot read it ({e.strerror})"
                      ) from None
  records = []
  for number, line in enumerate(lines, 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path} line {number}: not JSON ({e.msg})") from None
  return records


# --- the generated task with a hidden rule -----------------------------------------

POSITIVE = ("great", "bright", "lovely", "clean", "strong", "warm", "fresh", "sweet")
NEGATIVE = ("broken", "dirty", "weak", "noisy", "ugly", "stale", "cold", "slow")
NEUTRAL = ("small", "round", "blue", "old", "tall", "plain", "heavy", "quiet")
ADJECTIVES = POSITIVE + NEGATIVE + NEUTRAL
ITEMS = ("lamp", "garden", "train", "bridge", "kettle", "jacket", "boat", "table", "bicycle",
         "window", "clock", "tent", "piano", "camera", "basket", "ladder")
MALFORMED_SCORE = -1.5
MAX_ADJECTIVES = 3
REVIEW = Template("Review of the {item}:", " {review}", name="review")
_FORMAT = re.compile(r"\s*it is ([a-z]+(?: and [a-z]+)*)\.\s*")
_SIZES = {"train": 1200, "validation": 200, "test": 200}
_RANKED = 4  # completions ranked per prompt
_NOISE = 0.5  # the labeler's utility noise (true score units)


def true_score(completion: str) -> float:
  """The hidden rule: #positive - #negative adjectives of a well-formed completion."""
  match = _FORMAT.fullmatch(completion)
  if not match:
    return MALFORMED_SCORE
  words = match.group(1).split(" and ")
  if len(words) > MAX_ADJECTIVES or len(set(words)) < len(words) or \
      any(w not in ADJECTIVES for w in words):
    return MALFORMED_SCORE
  return float(sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words))


def _completion(rng: np.random.Generator) -> str:
  """A labeler-shown completion: mostly well-formed; one in ten misses its period."""
  words = rng.choice(ADJECTIVES, int(rng.integers(1, MAX_ADJECTIVES + 1)), replace=False)
  text = "it is " + " and ".join(words) + "."
  return text if rng.random() > 0.1 else text[:-1]


def _prompt_records(seed: int, salt: int) -> dict[str, list[dict]]:
  """Per split: items with `_RANKED` completions ranked by the noisy labeler."""
  rng = np.random.default_rng([seed, salt])
  out = {}
  for split in SPLITS:
    records = []
    for _ in range(_SIZES[split]):
      item = str(rng.choice(ITEMS))
      completions = [_completion(rng) for _ in range(_RANKED)]
      utility = [true_score(c) + _NOISE * rng.normal() for c in completions]
      ranks = (np.argsort(np.argsort(utility)[::-1]) + 1).tolist()
      records.append({"item": item, "prompt": REVIEW.apply({"item": item, "review": ""})[0],
                      "completions": [" " + c for c in completions], "ranks": ranks})
    out[split] = records
  return out


def review_rankings(split: str, seed: int = 0) -> list[dict]:
  """The generated task's ranking records of `split`."""
  if split not in SPLITS:
    raise ConfigError(f"split {split!r}: the review task has {', '.join(SPLITS)}")
  return _prompt_records(seed, 11)[split]


def review_task(seed: int = 0) -> Task:
  """Demonstrations for supervised fine-tuning before alignment: a random (unranked)
  completion per prompt, so the tuned policy writes the format with average quality."""
  splits = {split: tuple({"item": r["item"], "review": r["completions"][0].strip()}
                         for r in records) for split, records in _prompt_records(seed, 12).items()}
  return Task("review", splits, REVIEW, "rouge")


def preference_pairs(spec: str, split: str, seed: int = 0,
                     held_out: float = 0.05) -> list[PreferencePair]:
  """Pairs of `split` from config.align.preferences: "review" or "jsonl:PATH" (whose last
  `held_out` share of records is the validation split)."""
  if spec == "review":
    return records_to_pairs(review_rankings(split, seed), f"review/{split}")
  if not spec.startswith("jsonl:"):
    raise ConfigError(f"config.align.preferences={spec!r}: use 'review' (generated) or "
                      "jsonl:PATH")
  path = spec[len("jsonl:"):]
  records = read_jsonl(path)
  cut = len(records) - max(1, int(len(records) * held_out)) if len(records) > 1 else 1
  chosen = records[:cut] if split == "train" else records[cut:]
  pairs = records_to_pairs(chosen, path)
  if not pairs:
    raise ConfigError(f"config.align.preferences={spec!r}: the {split} split has no pairs")
  return pairs


def prompts_of(spec: str, split: str, seed: int = 0) -> list[str]:
  """Distinct prompts of the preference data (PPO samples its rollouts from them)."""
  return list(dict.fromkeys(p.prompt for p in preference_pairs(spec, split, seed)))
