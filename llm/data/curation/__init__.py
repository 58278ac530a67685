"""Curating a raw corpus before pretraining: a chain of named filters (deduplication,
Gopher / C4 quality rules, language identification, personal-data scrubbing) run
shard by shard in local processes, resumable, with a report of what each removed.

  cfg = curation.from_configdict(configs.curate.get_config())
  report = curation.curate(cfg, "jsonl:raw.jsonl", "runs/curated")
  # then train on config.data.source = curation.source_of("runs/curated")
"""

from llm.data.curation.registry import (DEFAULT_CHAIN, FILTERS, CurationConfig,
                                        from_configdict)
from llm.data.curation.report import markdown
from llm.data.curation.run import curate, kept_files, phases, source_of

__all__ = ["DEFAULT_CHAIN", "FILTERS", "CurationConfig", "curate", "from_configdict",
           "kept_files", "markdown", "phases", "source_of"]
