"""Direct preference optimisation on preference pairs, the start model as reference.

  python -m experiments.dpo --config configs/align.py:dpo \
      --config.train.init_from=runs/sft --workdir runs/dpo [--config.align.dpo_beta=0.1]
  ... --config.model.peft.method=lora --config.train.learning_rate=3e-3

Trains, then prints one JSON line: held-out preference loss and accuracy (the share of
pairs whose chosen completion gained more log-likelihood than the rejected one relative
to the reference) and, with --rater, the reward model's and the hidden rule's mean score
of sampled responses to held-out prompts.
"""

import json

from absl import flags

from experiments import cli
from experiments.common import start
from llm import train
from llm.align.rollout import rate_workdir
from llm.config import ConfigError

_CONFIG = cli.ConfigFlag("configs/align.py:dpo")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here.", required=True)
_RATER = flags.DEFINE_string("rater", None, "A reward model's workdir to score samples with.")


@cli.one_line_errors
def main(argv):
  del argv
  cfg = start(_CONFIG.value)
  if cfg.data.objective != "dpo":
    raise ConfigError(f"config.data.objective={cfg.data.objective!r}: experiments.dpo trains "
                      "objective 'dpo'")
  last = train.run(cfg, _WORKDIR.value)
  summary = {k: last.get(k) for k in ("step", "train_loss", "eval_loss", "eval_accuracy",
                                      "eval_chosen_reward", "eval_rejected_reward")}
  if _RATER.value:
    summary["samples"] = rate_workdir(_WORKDIR.value, _RATER.value)
  print(json.dumps(summary))


if __name__ == "__main__":
  cli.run(main, _CONFIG)
