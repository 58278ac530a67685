"""Reward hacking, measured: PPO runs (same reward model, same budget, different KL
coefficients) side by side, plus other policies (the SFT start, DPO) rated on held-out
prompts by the same reward model and by the hidden rule.

  python -m experiments.reward_hacking --ppo "KL 0=runs/ppo_kl0" --ppo "KL 1=runs/ppo_kl1" \
      --policy "SFT=runs/sft" --policy "DPO=runs/dpo" --rater runs/rm --out docs/

Writes OUT/reward_hacking.png and OUT/reward_hacking.md (the table it prints).
"""

import os

from absl import flags, logging

from experiments import cli
from llm.align.report import hacking_table, plot_hacking
from llm.align.rollout import rate_workdir
from llm.train.metrics import read_metrics

_PPO = flags.DEFINE_multi_string("ppo", [], "NAME=WORKDIR of an experiments.ppo run.")
_POLICY = flags.DEFINE_multi_string("policy", [], "NAME=WORKDIR of another policy to rate.")
_RATER = flags.DEFINE_string("rater", None, "The reward model's workdir.", required=True)
_OUT = flags.DEFINE_string("out", "docs", "Where the plot and the table go.")
_SAMPLES = flags.DEFINE_integer("samples", 256, "Responses rated per policy.")


def _named(specs):
  pairs = [spec.split("=", 1) for spec in specs]
  if any(len(p) != 2 for p in pairs):
    raise ValueError(f"--ppo / --policy: write NAME=WORKDIR, got {specs}")
  return dict(pairs)


@cli.one_line_errors
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  ppo_runs, policies = _named(_PPO.value), _named(_POLICY.value)
  runs = {name: read_metrics(workdir) for name, workdir in ppo_runs.items()}
  for name, records in runs.items():
    if not records or "true_score" not in records[0]:
      raise ValueError(f"--ppo {name}={ppo_runs[name]}: no PPO metrics on the generated task")
  held_out = {name: rate_workdir(workdir, _RATER.value, num_samples=_SAMPLES.value)
              for name, workdir in {**policies, **ppo_runs}.items()}
  table = hacking_table(runs, held_out)
  print(table)
  os.makedirs(_OUT.value, exist_ok=True)
  plot_hacking(runs, os.path.join(_OUT.value, "reward_hacking.png"))
  with open(os.path.join(_OUT.value, "reward_hacking.md"), "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  cli.run(main)
