"""Two data studies with one tokenizer (trained on the embedded corpus) and the same model:

  curation: the same steps on the raw degraded corpus vs on its curated output, scored on
            the embedded corpus's clean validation split;
  domain:   a general model (docstrings) continued on the domain (pydoc topics), on a 1:1
            mix, and on general text (the control), scored on both domains' validation text.

  python -m experiments.data_study --study curation --out runs/study
  python -m experiments.data_study --study domain --out runs/study --continue_steps 150
"""

import json
import math
import os

from absl import flags, logging

from configs import curate as curate_config
from configs import data_study
from experiments import cli
from llm import data, train
from llm.config import from_configdict
from llm.data import curation, raw_corpus
from llm.eval.report import lm_perplexity

_PRETRAIN = cli.ConfigFlag("configs/data_study.py:pretrain")
_CONTINUE_STEPS = flags.DEFINE_integer("continue_steps", 150, "Steps of continued pretraining "
                                       "(configs/data_study.py:continue) in the domain study.")
_STUDY = flags.DEFINE_enum("study", "curation", ["curation", "domain"], "Which study.")
_OUT = flags.DEFINE_string("out", None, "Directory for every run of the study.", required=True)


def _loss(workdir, source):
  cfg, params, tokenizer = train.load(workdir)
  return math.log(lm_perplexity(cfg, params, tokenizer, source, rows=1 << 30))


def _train(config_dict, workdir, tokenizer_path, **data_fields):
  config_dict = config_dict.copy_and_resolve_references()
  config_dict.data.update(dict(tokenizer_path=tokenizer_path, **data_fields))
  return train.run(from_configdict(config_dict), workdir, progress=False)


def _curation(out, tokenizer_path):
  raw = os.path.join(out, "raw.jsonl")
  if not os.path.exists(raw):
    raw_corpus.write_jsonl(raw_corpus.generate(data.embedded_documents("train")), raw)
  report = curation.curate(curation.from_configdict(curate_config.get_config()),
                           f"jsonl:{raw}", os.path.join(out, "curated"), raw_corpus.TARGETS)
  print(curation.markdown(report).split("\n\n")[1])
  print(f"kept {report['kept_docs']:.1%} of documents, {report['kept_bytes']:.1%} of bytes")
  for name, source in (("raw", f"jsonl:{raw}"), ("curated", curation.source_of(
      os.path.join(out, "curated")))):
    _train(_PRETRAIN.value, os.path.join(out, name), tokenizer_path, source=source)
  return {name: {"validation_loss": _loss(os.path.join(out, name), "embedded")}
          for name in ("raw", "curated")}


def _domain(out, tokenizer_path):
  general = os.path.join(out, "general")
  _train(_PRETRAIN.value, general, tokenizer_path, source="embedded:docstrings")
  runs = {"general (before)": general}
  for name, directory, fields in (  # general only: what the extra steps alone do
      ("general only", "general_more", {"source": "embedded:docstrings"}),
      ("domain only", "domain_only", {"source": "embedded:topics"}),
      ("general + domain 1:1", "mixture", {"sources": (("embedded:topics", 1.0),
                                                       ("embedded:docstrings", 1.0))})):
    config_dict, runs[name] = data_study.get_config("continue"), os.path.join(out, directory)
    config_dict.train.update(dict(init_from=general, steps=_CONTINUE_STEPS.value))
    _train(config_dict, runs[name], tokenizer_path, **fields)
  rows = {name: {"domain_loss": _loss(w, "embedded:topics"),
                 "general_loss": _loss(w, "embedded:docstrings")} for name, w in runs.items()}
  base = rows["general (before)"]
  for row in rows.values():
    row["domain_gain"] = base["domain_loss"] - row["domain_loss"]
    row["general_cost"] = row["general_loss"] - base["general_loss"]
  return rows


@cli.one_line_errors
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  tokenizer_path = os.path.join(out, "tokenizer.model")
  if not os.path.exists(tokenizer_path):  # one tokenizer, so losses per token compare
    data.train_tokenizer(data.embedded_documents("train"), _PRETRAIN.value.model.vocab_size,
                         tokenizer_path, _PRETRAIN.value.data.num_sentinels)
  rows = (_curation if _STUDY.value == "curation" else _domain)(out, tokenizer_path)
  columns = list(next(iter(rows.values())))
  print("| run | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1))
  for name, row in rows.items():
    print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
  with open(os.path.join(out, f"{_STUDY.value}.json"), "w") as f:
    json.dump(rows, f, indent=2)


if __name__ == "__main__":
  cli.run(main, _PRETRAIN)
