"""Prompt tuning (soft prompts) of a pretrained model on tasks (loss on completions only).

  python -m experiments.prompt_tuning --config configs/finetune.py:prompt \
      --config.train.init_from=runs/gpt_tiny --workdir runs/gpt_tiny_prompt

Prints the losses, the tasks' test metrics and the share of trainable params; a PEFT
run also writes its trainable params alone to WORKDIR/adapter (see experiments.evaluate).
"""

from absl import app, flags
from ml_collections import config_flags

from experiments.common import finetune, one_line_errors

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py:prompt",
                                          "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, adapter go here.",
                               required=True)


@one_line_errors
def main(argv):
  del argv
  finetune(_CONFIG.value, _WORKDIR.value, ("prompt",), "experiments.prompt_tuning")


if __name__ == "__main__":
  app.run(main)
