"""Filters a raw corpus into JSONL shards the data pipeline reads, and prints a report.

  python -m experiments.curate --config configs/curate.py --input jsonl:runs/raw/raw.jsonl \
      --output runs/curated
  python -m experiments.pretrain_clm --config configs/gpt.py:tiny --workdir runs/curated_gpt \
      --config.data.source='jsonl:runs/curated/shard-*.jsonl'

--input takes text:PATH[,PATH...] (documents separated by blank lines), jsonl:PATH (the
text under config.text_key, true labels under config.label_key if any) or embedded.
Re-running the same command resumes; a different config or input needs a new --output.
"""

from absl import flags

from experiments import cli
from llm.data import curation, raw_corpus

_CONFIG = cli.ConfigFlag("configs/curate.py")
_INPUT = flags.DEFINE_string("input", None, "text:PATH | jsonl:PATH | embedded", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the kept shards and the report.",
                              required=True)


@cli.one_line_errors
def main(argv):
  del argv
  cfg = curation.from_configdict(_CONFIG.value)
  # Precision and recall use the generator's labels (llm.data.raw_corpus), when present.
  report = curation.curate(cfg, _INPUT.value, _OUTPUT.value, targets=raw_corpus.TARGETS)
  print(curation.markdown(report), end="")
  print(f"kept shards: {curation.source_of(_OUTPUT.value)}; report: {_OUTPUT.value}/report.md")


if __name__ == "__main__":
  cli.run(main, _CONFIG)
