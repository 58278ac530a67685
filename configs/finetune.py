"""Fine-tuning a pretrained model on tasks (supervised: loss on completions only).

  python -m experiments.lora --config configs/finetune.py:lora \
      --config.train.init_from=runs/gpt_tiny --workdir runs/gpt_tiny_lora
  python -m experiments.prompt_tuning --config configs/finetune.py:prompt \
      --config.train.init_from=runs/gpt_tiny --workdir runs/gpt_tiny_prompt
  python -m experiments.finetune --config configs/finetune.py:full \
      --config.train.init_from=runs/gpt_tiny --workdir runs/gpt_tiny_full \
      --config.data.tasks=facts:1,translate:1,topic:1

Methods: full, lora, prompt, prefix, adapter, bitfit (`model.peft.method`). The model comes
from `train.init_from` (a training workdir, or a Hugging Face checkpoint directory);
the model fields below only matter without it (random init). Tasks: the generated
suite (facts, translate, summary, topic), `tfds:NAME` or `jsonl:PATH`, comma-separated
`name[:rate]` for a multitask mixture.
"""

import ml_collections

from llm.config import default_configdict

# method: (learning rate, weight decay). Fewer trainable params take larger steps.
METHODS = {
    "full": (5e-4, 0.1),
    "lora": (3e-3, 0.0),
    "prompt": (3e-2, 0.0),
    "prefix": (1e-2, 0.0),
    "adapter": (3e-3, 0.0),
    "bitfit": (5e-3, 0.0),
}
SIZES = tuple(METHODS)  # what `--config configs/finetune.py:METHOD` accepts (--help lists it)


def get_config(method: str = "lora") -> ml_collections.ConfigDict:
  method = method or "lora"
  if method not in METHODS:
    raise ValueError(f"configs/finetune.py:{method}: unknown method; choose one of "
                     f"{', '.join(METHODS)}")
  learning_rate, weight_decay = METHODS[method]
  cfg = default_configdict()
  cfg.model.update(dict(family="decoder", vocab_size=4096, d_model=128, num_layers=4,
                        num_heads=4, d_ff=512, max_len=256))
  cfg.model.peft.method = method
  if method == "lora":
    # The token table in both its uses (lookup and tied head), rank 8: on `topic` it matched
    # full fine-tuning with 0.8% trainable, where attention + MLP LoRA reached 37.5%
    # (benchmarks/results/peft_compare_2026-12-02_table_lora.json).
    cfg.model.peft.lora_targets = r"/embed$"
  cfg.data.update(dict(objective="sft", tasks="facts", seq_len=128, batch_size=16))
  cfg.train.update(dict(steps=300, learning_rate=learning_rate, weight_decay=weight_decay,
                        warmup_steps=30, log_every=20, eval_every=100, eval_batches=8,
                        checkpoint_every=100, num_samples=0))
  return cfg
