"""Masked-LM pretraining of an encoder (BERT / RoBERTa).

  python -m experiments.pretrain_mlm --config configs/bert.py:tiny --workdir /tmp/bert_tiny

Trains on the embedded corpus by default and prints the final MLM loss and masked-token
accuracy (the accuracy of predicting the original token at the selected positions).
"""

import json

from absl import flags

from experiments import cli
from experiments.common import start
from llm import train

_CONFIG = cli.ConfigFlag("configs/bert.py:tiny")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, tokenizer go here.",
                               required=True)


@cli.one_line_errors
def main(argv):
  del argv
  cfg = start(_CONFIG.value)
  last = train.run(cfg, _WORKDIR.value)
  print(json.dumps({"step": last.get("step"), "train_mlm_loss": last.get("train_loss"),
                    "train_masked_accuracy": last.get("train_accuracy"),
                    "eval_mlm_loss": last.get("eval_loss"),
                    "eval_masked_accuracy": last.get("eval_accuracy"),
                    "tokens_per_s": last.get("tokens_per_s")}))


if __name__ == "__main__":
  cli.run(main, _CONFIG)
