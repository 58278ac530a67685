"""PPO against a reward model with a per-token KL penalty to the frozen start policy.

  python -m experiments.ppo --config configs/align.py:ppo --config.align.rater=runs/rm \
      --config.train.init_from=runs/sft --workdir runs/ppo
  ... --config.align.kl_coef=0                 # no penalty: watch the reward get hacked
  ... --config.align.kl_target=4               # adaptive coefficient (Ziegler et al.)
  ... --config.model.peft.method=lora --config.train.learning_rate=1e-3

train.steps counts rollouts (align.rollout_batch prompts each, align.ppo_epochs passes
of align.ppo_minibatches updates). Logs per rollout to metrics.jsonl and ppo.png:
reward-model score, KL to the reference (sampled and exact), entropy, clip fraction,
value loss, the reference's perplexity of the samples and the hidden rule's true score.
Prints the last rollout's metrics and a rating of samples on held-out prompts.
"""

import json

from absl import flags

from experiments import cli
from experiments.common import start
from llm.align.rollout import rate_workdir, train_ppo
from llm.config import ConfigError

_CONFIG = cli.ConfigFlag("configs/align.py:ppo")
_WORKDIR = flags.DEFINE_string("workdir", None, "Metrics, plot and the policy go here.",
                               required=True)


@cli.one_line_errors
def main(argv):
  del argv
  cfg = start(_CONFIG.value)
  if cfg.data.objective != "ppo":
    raise ConfigError(f"config.data.objective={cfg.data.objective!r}: experiments.ppo trains "
                      "objective 'ppo'")
  last = train_ppo(cfg, _WORKDIR.value)
  print(json.dumps({"last_rollout": last,
                    "held_out": rate_workdir(_WORKDIR.value, cfg.align.rater)}))


if __name__ == "__main__":
  cli.run(main, _CONFIG)
