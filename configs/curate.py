"""Curating a raw corpus: the filter chain, in order, and each filter's parameters.

  python -m experiments.raw_corpus --output runs/raw/raw.jsonl
  python -m experiments.curate --config configs/curate.py --input jsonl:runs/raw/raw.jsonl \
      --output runs/curated
  python -m experiments.curate --config configs/curate.py:dedup --input text:/data/*.txt \
      --output runs/dedup --config.near_dedup.threshold=0.8

Variants: `full` (every filter), `dedup` (exact and near deduplication only), `quality`
(the heuristic rules and language id, no deduplication). Thresholds are set for the
embedded corpus (Python documentation); the Gopher values are in llm/data/curation.
"""

import ml_collections

from llm.data.curation.registry import DEFAULT_CHAIN, FILTERS

SIZES = {  # variants of the chain
    "full": DEFAULT_CHAIN,
    "dedup": ("exact_dedup", "near_dedup"),
    "quality": tuple(n for n in DEFAULT_CHAIN if not n.endswith("_dedup")),
}


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  variant = variant or "full"
  if variant not in SIZES:
    raise ValueError(f"configs/curate.py:{variant}: unknown variant; choose one of "
                     f"{', '.join(SIZES)}")
  cfg = ml_collections.ConfigDict()
  cfg.filters = ",".join(SIZES[variant])
  cfg.shard_docs = 1000
  cfg.processes = 0  # 0 = one worker per core
  cfg.text_key = "text"
  cfg.label_key = "labels"
  cfg.examples = 3
  for name, spec in FILTERS.items():  # every parameter is overridable from the command line
    cfg[name] = ml_collections.ConfigDict({k: p.default for k, p in spec.params.items()})
  return cfg
