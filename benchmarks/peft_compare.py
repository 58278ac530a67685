"""Full fine-tuning vs LoRA vs prompt tuning vs adapters vs BitFit from one base model,
on one generated task: task metric, trainable params, peak training memory of the
compiled step (XLA's memory analysis: arguments + outputs + temporaries - aliased),
and wall time. Prints one JSON object; --markdown also prints the table.

  python benchmarks/peft_compare.py --base runs/gpt_tiny --task topic --steps 300 \
      --out /tmp/peft_compare

The base workdir is any decoder pretraining run (the README's first command makes one).
"""

from __future__ import annotations

import argparse
import os
import re
import time

from common import json_stdout, log, setup_logging

import jax

from llm import config as config_lib, parallel, peft, train
from llm.eval.report import evaluate_model
from llm.train import loop

METHODS = ("full", "lora", "prompt", "prefix", "adapter", "bitfit")


def parse_args():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--base", required=True, help="pretraining workdir to start from")
  p.add_argument("--task", default="topic")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--max_examples", type=int, default=200)
  p.add_argument("--out", default="/tmp/peft_compare")
  p.add_argument("--markdown", action="store_true")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="a config override for every method, e.g. train.learning_rate=1e-2")
  return p.parse_args()


def method_config(method: str, args) -> config_lib.Config:
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "finetune_config", os.path.join(os.path.dirname(__file__), "..", "configs", "finetune.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cd = module.get_config(method)
  cd.data.tasks = args.task
  cd.train.update(dict(steps=args.steps, init_from=args.base, eval_every=args.steps,
                       checkpoint_every=args.steps, log_every=max(args.steps // 10, 1)))
  for override in args.set:
    field, value = override.split("=", 1)
    *groups, name = field.split(".")
    node = cd
    for group in groups:
      node = node[group]
    node[name] = type(node[name])(value) if node[name] is not None else value
  return config_lib.from_configdict(cd)


def peak_step_bytes(cfg: config_lib.Config) -> int:
  """Peak memory XLA plans for one train step of `cfg` (a trained run's resolved config),
  on one device."""
  mesh = parallel.make_mesh(config_lib.ParallelConfig(data=1), jax.devices()[:1])
  state, shardings = loop.create_state(cfg, mesh)
  batch = {k: jax.numpy.asarray(v) for k, v in loop.objectives.get("sft").example_batch(
      cfg, cfg.data.batch_size).items() if k in ("inputs", "targets", "weights", "segment_ids",
                                                 "positions")}
  train_fn, _ = loop.compiled_steps(shardings, mesh)
  stats = train_fn.lower(state, batch).compile().memory_analysis()
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def main():
  args = parse_args()
  setup_logging()
  with json_stdout() as result:
    base_cfg, base_params, tokenizer = train.load(args.base)
    result["base"] = {"workdir": args.base, "params": peft.count(base_params)}
    result["base"]["scores"] = evaluate_model(base_cfg, base_params, tokenizer, args.task,
                                              max_examples=args.max_examples,
                                              lm_source=None)["tasks"][args.task][0]
    rows = {}
    for method in args.methods.split(","):
      cfg = method_config(method, args)
      # A regex override (lora_targets) has '/', '|', '$': keep the directory name plain.
      tag = re.sub(r"[^A-Za-z0-9.=-]+", "_", "_".join(args.set)).replace("=", "-")
      workdir = os.path.join(args.out, f"{args.task}_{method}{'_' + tag if tag else ''}")
      start = time.perf_counter()
      last = train.run(cfg, workdir, progress=False)
      seconds = time.perf_counter() - start
      cfg, params, _ = train.load(workdir)
      pattern = peft.trainable_pattern(cfg.model.peft, cfg.train.trainable)
      trainable = peft.count(peft.split(params, pattern)[0])
      scores = evaluate_model(cfg, params, tokenizer, args.task, max_examples=args.max_examples,
                              lm_source="embedded")
      rows[method] = {"scores": scores["tasks"][args.task][0],
                      "lm_perplexity": scores.get("lm_perplexity"),
                      "eval_loss": last.get("eval_loss"), "trainable_params": trainable,
                      "trainable_percent": 100.0 * trainable / result["base"]["params"],
                      "peak_step_bytes": peak_step_bytes(cfg), "train_seconds": seconds}
      log.info("%s: %s", method, rows[method])
    result["methods"] = rows
  if args.markdown:
    metric = next(k for k in result["base"]["scores"] if k != "n")
    print(f"| method | {args.task} {metric} | trainable params | % | peak step MB | s |")
    print("|---|---|---|---|---|---|")
    print(f"| base (no tuning) | {result['base']['scores'][metric]:.1f} | 0 | 0 | - | - |")
    for method, row in rows.items():
      print(f"| {method} | {row['scores'][metric]:.1f} | {row['trainable_params']:,} | "
            f"{row['trainable_percent']:.2f} | {row['peak_step_bytes'] / 2**20:.1f} | "
            f"{row['train_seconds']:.0f} |")


if __name__ == "__main__":
  main()
