"""Causal-LM pretraining: the main job.

  python -m experiments.pretrain_clm --config configs/gpt.py:tiny --workdir /tmp/gpt_tiny

Trains on the embedded corpus by default (offline), resumes from the workdir's latest
checkpoint, then prints the final losses and a few samples (prompts: train.sample_prompts,
else the start of a few validation documents). --help lists the sizes and flags.
"""

import json

from absl import flags

from experiments import cli
from experiments.common import start
from llm import data, eval as eval_lib, train
from llm.inference import SamplingConfig
from llm.inference.workdir import terminal_text

_CONFIG = cli.ConfigFlag("configs/gpt.py:tiny")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, tokenizer go here.",
                               required=True)


@cli.one_line_errors
def main(argv):
  del argv
  cfg = start(_CONFIG.value)
  last = train.run(cfg, _WORKDIR.value)
  _, params, tokenizer = train.load(_WORKDIR.value)
  rows = data.build_dataset(cfg.data, tokenizer, cfg.data.eval_split)
  summary = {"step": last.get("step"), "train_loss": last.get("train_loss"),
             "eval_loss": last.get("eval_loss"),
             "eval_unigram_entropy": eval_lib.unigram_entropy(rows["targets"], rows["weights"]),
             "tokens_per_s": last.get("tokens_per_s"), "mfu": last.get("mfu")}
  print(json.dumps(summary))
  sampling = SamplingConfig(temperature=0.8, top_k=40, max_new_tokens=cfg.train.sample_tokens,
                            eos_id=tokenizer.eos_id)
  prompts = train.sample_prompts(cfg)
  for prompt, text in zip(prompts, train.sample_texts(cfg, params, tokenizer, prompts, sampling)):
    print(f"--- {prompt!r} -> {terminal_text(prompt + text)}")


if __name__ == "__main__":
  cli.run(main, _CONFIG)
