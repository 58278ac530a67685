"""Writes the raw corpus: the embedded corpus's training split degraded like crawled text
(duplicates, boilerplate, markup, base64, fragments, other scripts, spam, personal
data), each document with its true defect labels (llm/data/raw_corpus.py).

  python -m experiments.raw_corpus --output runs/raw/raw.jsonl --seed 0
"""

from absl import flags

from experiments import cli
from llm.data import corpus, raw_corpus

_OUTPUT = flags.DEFINE_string("output", None, "The JSONL file to write.", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random choice.")


@cli.one_line_errors
def main(argv):
  del argv
  records = raw_corpus.generate(corpus.embedded_documents("train"), seed=_SEED.value)
  raw_corpus.write_jsonl(records, _OUTPUT.value)
  counts = raw_corpus.label_counts(records)
  print(f"{len(records)} documents -> {_OUTPUT.value}; by label: "
        + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
  cli.run(main)
