"""Distils a trained teacher into a smaller student on the pretraining text.

  python -m experiments.distill --config configs/align.py:distill \
      --config.compress.teacher=runs/gpt_align --workdir runs/student
  ... --config.compress.distill_alpha=0 --workdir runs/student_scratch   # the baseline:
      # the same student, init, batches and steps, on the hard labels only

The student's architecture is config.model (same vocabulary as the teacher; it uses the
teacher's tokenizer). Prints one JSON line: the student's and the teacher's validation
perplexity, the student's hard-label eval loss, and both sizes.
"""

import json

from absl import flags

from experiments import cli
from experiments.common import start
from llm import peft, train
from llm.compress import distill
from llm.config import ConfigError
from llm.eval.report import lm_perplexity

_CONFIG = cli.ConfigFlag("configs/align.py:distill")
_WORKDIR = flags.DEFINE_string("workdir", None, "The student's checkpoints and metrics.",
                               required=True)


@cli.one_line_errors
def main(argv):
  del argv
  cfg = start(_CONFIG.value)
  if cfg.data.objective != "distill":
    raise ConfigError(f"config.data.objective={cfg.data.objective!r}: experiments.distill "
                      "trains objective 'distill'")
  cfg = distill.student_config(cfg)
  last = train.run(cfg, _WORKDIR.value)
  cfg, student, tokenizer = train.load(_WORKDIR.value)  # without the teacher
  teacher_cfg, teacher, _ = train.load(cfg.compress.teacher)
  print(json.dumps({
      "step": last.get("step"), "alpha": cfg.compress.distill_alpha,
      "temperature": cfg.compress.distill_temperature,
      "eval_hard_loss": last.get("eval_hard_loss"),
      "student_perplexity": lm_perplexity(cfg, student, tokenizer, cfg.data.source),
      "teacher_perplexity": lm_perplexity(teacher_cfg, teacher, tokenizer, cfg.data.source),
      "student_params": peft.count(student), "teacher_params": peft.count(teacher)}))


if __name__ == "__main__":
  cli.run(main, _CONFIG)
