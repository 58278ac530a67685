"""Scores trained models on task sets and on the pretraining text; writes JSON and a
markdown table (one row per model: before / after fine-tuning shows forgetting).

  python -m experiments.evaluate --workdir runs/gpt_tiny --workdir runs/gpt_tiny_lora \
      --tasks facts,translate --k_shot 0,1,4 --out runs/eval
  python -m experiments.evaluate --workdir runs/gpt_tiny --adapter runs/gpt_tiny_lora/adapter
  python -m experiments.evaluate --workdir runs/sft --workdir runs/ppo --rater runs/rm
      # reward-model score (and the hidden rule's true score) of sampled responses
"""

import dataclasses
import json
import os

from absl import flags, logging

from experiments import cli
from llm import peft, train
from llm.eval.report import evaluate_model, markdown_table

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "Workdir(s) to evaluate.", required=True)
_ADAPTER = flags.DEFINE_string("adapter", None, "An adapter directory applied to the (single) "
                               "--workdir's model (a PEFT run's workdir/adapter).")
_TASKS = flags.DEFINE_string("tasks", None, "Tasks, comma-separated (default: each workdir's "
                             "config.data.tasks).")
_K_SHOT = flags.DEFINE_list("k_shot", ["0"], "In-context examples per prompt, e.g. 0,1,4.")
_SPLIT = flags.DEFINE_string("split", "test", "Task split to score.")
_MAX = flags.DEFINE_integer("max_examples", 100, "Examples per task (0 = all).")
_LM = flags.DEFINE_string("lm_source", "embedded", "Text whose perplexity is reported "
                          "(pretraining data); '' to skip.")
_OUT = flags.DEFINE_string("out", None, "Directory for results.json and results.md.")
_RATER = flags.DEFINE_string("rater", None, "A reward model's workdir (experiments.reward_model) "
                             "that scores responses sampled to its held-out prompts.")


@cli.one_line_errors
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _ADAPTER.value and len(_WORKDIR.value) != 1:
    raise ValueError("--adapter applies to one --workdir; give exactly one")
  results = {}
  for workdir in _WORKDIR.value:
    cfg, params, tokenizer = train.load(workdir)
    name = workdir
    if _ADAPTER.value:
      model_cfg, params = peft.load_adapter(_ADAPTER.value, cfg.model, params)
      cfg, name = dataclasses.replace(cfg, model=model_cfg), _ADAPTER.value
    tasks = _TASKS.value or cfg.data.tasks
    if not tasks and not _RATER.value:
      raise ValueError(f"--tasks: {workdir} was not fine-tuned on tasks; say which to score")
    results[name] = evaluate_model(cfg, params, tokenizer, tasks, [int(k) for k in _K_SHOT.value],
                                   _SPLIT.value, _MAX.value or None, _LM.value or None)
    if _RATER.value:
      from llm.align.reward import Rater
      from llm.align.rollout import rate_policy
      results[name]["rater"] = rate_policy(cfg, params, tokenizer, Rater.load(_RATER.value))
  table = markdown_table(results)
  if _RATER.value:
    table += "\n\n" + "\n".join(f"{name}: rater {json.dumps(r['rater'])}"
                                  for name, r in results.items())
  print(table)
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
      json.dump(results, f, indent=2, default=str)
    with open(os.path.join(_OUT.value, "results.md"), "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  cli.run(main)
