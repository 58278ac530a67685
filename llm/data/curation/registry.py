"""The named filters, their parameters with ranges, and the validated run config.

A filter is either a document filter (`text, params -> text | None`, run shard by
shard) or a corpus filter (a key per document, run shard by shard, then one selection
over all keys in order). `configs/curate.py` names the chain and sets parameters;
`CurationConfig.from_configdict` checks every name and range at the boundary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

from llm.config import ConfigError
from llm.data.curation import dedup, filters


@dataclasses.dataclass(frozen=True)
class Param:
  default: Any
  low: Optional[float] = None  # inclusive bounds for numbers; None = unbounded
  high: Optional[float] = None
  low_open: bool = False  # the bound itself is not allowed

  def check(self, where: str, value: Any) -> Any:
    kind = type(self.default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) != isinstance(self.default, bool):
      raise ConfigError(f"config.{where}={value!r}: expected {kind.__name__}")
    if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
      raise ConfigError(f"config.{where}={value!r}: must be {'>' if self.low_open else '>='} "
                        f"{self.low}{'' if self.high is None else f' and <= {self.high}'}")
    if self.high is not None and value > self.high:
      raise ConfigError(f"config.{where}={value!r}: must be <= {self.high}")
    return value


@dataclasses.dataclass(frozen=True)
class Filter:
  name: str
  params: Mapping[str, Param]
  apply: Optional[Callable] = None  # document filter: (text, params) -> text | None
  key: Optional[Callable] = None  # corpus filter: (text, params) -> key (str or array)
  select: Optional[Callable] = None  # (keys in corpus order, params) -> keep flags

  @property
  def is_document_filter(self) -> bool:
    return self.apply is not None


_FRACTION = dict(low=0.0, high=1.0)
FILTERS: dict[str, Filter] = {f.name: f for f in (
    Filter("boilerplate", {"max_fraction": Param(0.8, **_FRACTION)}, apply=filters.boilerplate),
    Filter("word_count", {"min_words": Param(20, 0), "max_words": Param(100_000, 1)},
           apply=filters.word_count),
    Filter("mean_word_length", {"min_length": Param(3.0, 0.0), "max_length": Param(15.0, 0.0)},
           apply=filters.mean_word_length),
    Filter("symbol_ratio", {"max_ratio": Param(0.25, 0.0)}, apply=filters.symbol_ratio),
    Filter("alpha_ratio", {"min_ratio": Param(0.5, **_FRACTION)}, apply=filters.alpha_ratio),
    Filter("line_punctuation", {"min_fraction": Param(0.1, **_FRACTION)},
           apply=filters.line_punctuation),
    Filter("duplicate_lines", {"max_line_fraction": Param(0.3, **_FRACTION),
                               "max_char_fraction": Param(0.2, **_FRACTION)},
           apply=filters.duplicate_lines),
    Filter("duplicate_ngrams", {"scale": Param(3.0, 0.0, low_open=True)},
           apply=filters.duplicate_ngrams),
    Filter("language", {"language": Param("en"), "min_score": Param(0.01, **_FRACTION)},
           apply=filters.language),
    Filter("exact_dedup", {}, key=lambda text, params: dedup.exact_key(text),
           select=lambda keys, params: dedup.select_first(keys)),
    Filter("near_dedup", {"threshold": Param(0.7, 0.0, 1.0, low_open=True),
                          "num_perm": Param(128, 16, 1024), "ngram": Param(5, 1, 20),
                          "seed": Param(1, 0)},
           key=dedup.minhash_signature, select=dedup.select_near),
    Filter("pii", {}, apply=filters.pii),
)}
DEFAULT_CHAIN = ("boilerplate", "word_count", "mean_word_length", "symbol_ratio", "alpha_ratio",
                 "line_punctuation", "duplicate_lines", "duplicate_ngrams", "language",
                 "exact_dedup", "near_dedup", "pii")
SETTINGS = ("filters", "shard_docs", "processes", "text_key", "label_key", "encoding",
            "examples")


@dataclasses.dataclass(frozen=True)
class CurationConfig:
  filters: tuple[str, ...] = DEFAULT_CHAIN  # applied in this order
  params: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  shard_docs: int = 1000  # documents per shard: the unit of parallel work and of resuming
  processes: int = 0  # local worker processes; 0 = one per core (at most one per shard)
  text_key: str = "text"  # jsonl input: the field holding the text
  label_key: str = "labels"  # jsonl input: true defect labels, if any (for precision / recall)
  encoding: str = "utf-8"  # text and jsonl input files' encoding (as config.data.encoding)
  examples: int = 3  # removed / changed documents quoted per filter in the report

  def params_of(self, name: str) -> dict:
    return dict(self.params[name])

  def to_dict(self) -> dict:
    return {"filters": list(self.filters), "params": {k: dict(v) for k, v in self.params.items()},
            **{k: getattr(self, k) for k in SETTINGS if k != "filters"}}


def parse_chain(spec: str | tuple) -> tuple[str, ...]:
  names = tuple(n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec)
                if n.strip())
  unknown = [n for n in names if n not in FILTERS]
  if unknown or not names:
    raise ConfigError(f"config.filters: unknown filter {', '.join(unknown) or '(none given)'}; "
                      f"choose from {', '.join(FILTERS)}")
  if len(set(names)) != len(names):
    raise ConfigError(f"config.filters={','.join(names)}: a filter is named twice; name each once")
  return names


def from_configdict(cd: Any) -> CurationConfig:
  """Validates a ConfigDict (or mapping) of `configs/curate.py` into a CurationConfig."""
  values = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
  unknown = sorted(set(values) - set(SETTINGS) - set(FILTERS))
  if unknown:
    raise ConfigError(f"config.{unknown[0]}: unknown field; valid fields: "
                      f"{', '.join(SETTINGS + tuple(FILTERS))}")
  chain = parse_chain(values["filters"]) if "filters" in values else DEFAULT_CHAIN
  params = {}
  for name, spec in FILTERS.items():
    given = dict(values[name]) if name in values else {}
    extra = sorted(set(given) - set(spec.params))
    if extra:
      raise ConfigError(f"config.{name}.{extra[0]}: unknown parameter; {name} takes "
                        f"{', '.join(spec.params) or 'none'}")
    params[name] = {k: p.check(f"{name}.{k}", given[k]) if k in given else p.default
                    for k, p in spec.params.items()}
  _check_across(chain, params)
  settings = {k: values[k] for k in SETTINGS if k in values and k != "filters"}
  cfg = CurationConfig(filters=chain, params=params, **settings)
  for name in ("shard_docs", "examples", "processes"):
    low = 1 if name == "shard_docs" else 0
    if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < low:
      raise ConfigError(f"config.{name}={getattr(cfg, name)!r}: must be an integer >= {low}")
  return cfg


def _check_across(chain, params):
  if "language" in chain and params["language"]["language"] not in filters.languages():
    raise ConfigError(f"config.language.language={params['language']['language']!r}: not a "
                      f"language the model knows; use an ISO 639-1 code such as en, de, fr")
  word = params["word_count"]
  if word["min_words"] > word["max_words"]:
    raise ConfigError(f"config.word_count.min_words={word['min_words']} exceeds max_words="
                      f"{word['max_words']}; lower one")
