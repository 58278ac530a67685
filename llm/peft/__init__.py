"""Parameter-efficient adaptation: LoRA, prompt and prefix tuning, adapters, BitFit, full
fine-tuning.

`model.peft.method` picks the method. `llm.models.build` wraps the family module in
`Adapted` for the methods that add params (lora, prompt, prefix, adapter); `partition.split`
divides the params into trainable and frozen by `config.train.trainable` (default: the
method's own params; bitfit: the biases; full: everything).
"""

from llm.peft import lora, prefix, prompt
from llm.peft.export import load_adapter, save_adapter
from llm.peft.module import Adapted, needs_interception
from llm.peft.partition import DEFAULT_TRAINABLE, count, merge, paths, split, trainable_pattern

__all__ = ["Adapted", "DEFAULT_TRAINABLE", "count", "load_adapter", "lora", "merge",
           "needs_interception", "paths", "prefix", "prompt", "save_adapter", "split",
           "trainable_pattern"]
