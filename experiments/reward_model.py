"""A reward model from preference rankings (Bradley-Terry on chosen / rejected pairs).

  python -m experiments.reward_model --config configs/align.py:reward \
      --config.train.init_from=runs/sft --workdir runs/rm
  ... --config.model.peft.method=lora        # LoRA backbone, trained head
  ... --config.align.preferences=jsonl:/data/rankings.jsonl

Trains, then prints one JSON line: pairwise accuracy on every held-out pair and, for the
generated task, how often it orders pairs as the hidden rule does. The workdir then
rates any model's completions: `experiments.evaluate --rater WORKDIR`.
"""

import json

from absl import flags

from experiments import cli
from experiments.common import start
from llm import train
from llm.align import reward
from llm.config import ConfigError

_CONFIG = cli.ConfigFlag("configs/align.py:reward")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here.", required=True)


@cli.one_line_errors
def main(argv):
  del argv
  cfg = start(_CONFIG.value)
  if cfg.data.objective != "reward":
    raise ConfigError(f"config.data.objective={cfg.data.objective!r}: experiments.reward_model "
                      "trains objective 'reward'")
  last = train.run(cfg, _WORKDIR.value)
  rater = reward.Rater.load(_WORKDIR.value)
  report = reward.held_out_report(rater, cfg.align.preferences, cfg.data.shuffle_seed)
  print(json.dumps({"step": last.get("step"), "train_loss": last.get("train_loss"),
                    "train_accuracy": last.get("train_accuracy"), **report}))


if __name__ == "__main__":
  cli.run(main, _CONFIG)
