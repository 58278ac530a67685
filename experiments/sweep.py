"""Runs every trial of a sweep, each in its own workdir, then writes the report.

  python -m experiments.sweep --config configs/sweeps/isoflop.py --workdir runs/isoflop
  python -m experiments.sweep --config configs/sweeps/ablations.py:lr --workdir runs/lr \
      --workers 2 --config.train.steps=300          # a base override for every trial
  python -m experiments.sweep ... --storage postgresql://host/db   # many machines, one queue
  python -m experiments.sweep ... --entry_point experiments.lora   # trials as that command

Trials are recorded in an Optuna study (a SQLite file in --workdir unless --storage).
Rerunning the command skips finished trials, resumes interrupted ones from their
checkpoints, and retries failed ones with --retry_failed.
"""

import sys

from absl import flags

from experiments import cli

# --config FILE.py[:ARG]: a sweep file with get_config(arg) and get_sweep(arg) (required;
# the default only keeps the shared parser's contract).
_CONFIG = cli.ConfigFlag("configs/sweeps/isoflop.py:quick")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep directory: DIR/<trial> per trial.",
                               required=True)
_STORAGE = flags.DEFINE_string("storage", "", "Optuna database URL (default: SQLite in DIR).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Local worker processes running trials at once.")
_RETRY = flags.DEFINE_bool("retry_failed", False, "Run failed trials again.")
_ENTRY = flags.DEFINE_string("entry_point", "", "Run each trial as `python -m ENTRY_POINT` "
                             "(default: the train loop, in-process in each worker).")


@cli.one_line_errors
def main(argv):
  del argv
  import optuna
  from absl import logging

  from llm import config_cli
  from llm.sweep import report, runner, spec
  logging.set_verbosity(logging.WARNING)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  _, config_spec, overrides, _ = config_cli.split_args(sys.argv, takes_config=True)
  if config_spec is None:
    raise ValueError("--config is required: --config FILE.py[:ARG], a sweep file such as "
                     "configs/sweeps/isoflop.py")
  _, trials, _, _ = spec.load_sweep_file(config_spec)
  definition = runner.prepare(config_spec, _CONFIG.value, trials, _WORKDIR.value,
                              dict(overrides), _ENTRY.value)
  print(f"sweep {config_spec}: {len(definition['trials'])} trials validated", flush=True)
  try:
    states = runner.launch(_WORKDIR.value, definition, _STORAGE.value, _WORKERS.value,
                           _RETRY.value)
  except KeyboardInterrupt:
    print("interrupted: running trials saved their checkpoints; rerun the same command "
          "to resume", file=sys.stderr)
    sys.exit(130)
  written = report.write(_WORKDIR.value)
  print(written["markdown"])
  counts = {s: list(states.values()).count(s) for s in dict.fromkeys(states.values())}
  print(f"trials: {counts}; report: {written['files'][0]}")
  if any(s != "complete" for s in states.values()):
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main, _CONFIG)
