"""Prompt tuning (soft prompts) or prefix tuning (per-layer keys and values) of a
pretrained model on tasks (loss on completions only).

  python -m experiments.prompt_tuning --config configs/finetune.py:prompt \
      --config.train.init_from=runs/gpt_tiny --workdir runs/gpt_tiny_prompt
  python -m experiments.prompt_tuning --config configs/finetune.py:prefix ...

Prints the losses, the tasks' test metrics and the share of trainable params; a PEFT
run also writes its trainable params alone to WORKDIR/adapter (see experiments.evaluate).
"""

from experiments.common import finetune_app

if __name__ == "__main__":
  finetune_app("configs/finetune.py:prompt", ("prompt", "prefix"), "experiments.prompt_tuning")
