"""Magnitude and N:M pruning of a trained model: perplexity against sparsity, before and
after retraining with the masks kept (pruned weights stay zero).

  python -m experiments.prune --config configs/align.py:prune \
      --config.train.init_from=runs/gpt_align --workdir runs/prune
  ... --config.compress.prune_scopes=layer --config.compress.sparsities=0.5,0.9
  ... --config.compress.nm=""                  # skip the 2:4 row

train.steps is the retraining budget per setting. Writes metrics.jsonl and prune.png,
prints a markdown table.
"""

from absl import flags

from experiments import cli
from experiments.common import start
from llm.compress import prune

_CONFIG = cli.ConfigFlag("configs/align.py:prune")
_WORKDIR = flags.DEFINE_string("workdir", None, "Metrics and the plot go here.", required=True)


@cli.one_line_errors
def main(argv):
  del argv
  cfg = start(_CONFIG.value)
  results = prune.sweep(cfg, _WORKDIR.value)
  print(f"| pruning | sparsity | perplexity | after {cfg.train.steps} retraining steps |")
  print("|---|---|---|---|")
  for r in results:
    print(f"| {r['scope']} | {100 * r['sparsity']:.1f}% | {r['perplexity']:.2f} | "
          f"{r['retrained_perplexity']:.2f} (sparsity {100 * r['retrained_sparsity']:.1f}%) |")


if __name__ == "__main__":
  cli.run(main, _CONFIG)
