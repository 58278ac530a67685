"""Full fine-tuning, bottleneck adapters or BitFit of a pretrained model on tasks
(loss on completions only).

  python -m experiments.finetune --config configs/finetune.py:full \
      --config.train.init_from=runs/gpt_tiny --workdir runs/gpt_tiny_full
  python -m experiments.finetune --config configs/finetune.py:adapter ...  # or :bitfit

Prints the losses, the tasks' test metrics and the share of trainable params; a PEFT
run also writes its trainable params alone to WORKDIR/adapter (see experiments.evaluate).
"""

from experiments.common import finetune_app

if __name__ == "__main__":
  finetune_app("configs/finetune.py:full", ("full", "adapter", "bitfit"), "experiments.finetune")
