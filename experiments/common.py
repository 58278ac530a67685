"""What the training entry points share: the start of a run and the fine-tuning job."""

import logging

from absl import flags

from experiments import cli
from llm.config import ConfigError

# A multi-process job (see README "Scale"): these, else the JAX_* environment variables;
# under SLURM, Open MPI or on a TPU pod slice jax finds them itself.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in the job (JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process, 0 .. num_processes - 1 (JAX_PROCESS_ID).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 30, "A process silent this long "
                                  "counts as dead, and the others exit.")


def start(config_dict):
  """The start of every training entry point: quiet logs, join a multi-host job if the
  flags or the environment describe one, and validate the config at the boundary."""
  from absl import logging as absl_logging

  from llm import config as config_lib
  from llm import parallel
  absl_logging.set_verbosity(absl_logging.WARNING)
  show_progress_messages()
  parallel.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                            _HEARTBEAT.value)
  return config_lib.check_sampling(config_lib.from_configdict(config_dict))


def show_progress_messages():
  """The library's INFO lines ("resumed from step N", ...) on stderr, as plain text."""
  logger = logging.getLogger("llm")
  if not logger.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False


def finetune(config_dict, workdir: str, methods: tuple[str, ...], entry_point: str):
  """Trains `config_dict` (an sft run from train.init_from), then scores the tasks' test
  split and prints one JSON line: losses, task metrics, trainable / total params."""
  import json

  from llm import peft, train
  from llm.eval.report import evaluate_model
  cfg = start(config_dict)
  if cfg.model.peft.method not in methods:
    raise ConfigError(f"config.model.peft.method={cfg.model.peft.method!r}: {entry_point} "
                      f"trains {' / '.join(methods)}; use the entry point for that method")
  last = train.run(cfg, workdir)
  cfg, params, tokenizer = train.load(workdir)
  pattern = peft.trainable_pattern(cfg.model.peft, cfg.train.trainable)
  trainable = peft.count(peft.split(params, pattern)[0])
  scores = evaluate_model(cfg, params, tokenizer, cfg.data.tasks, lm_source=None)["tasks"]
  print(json.dumps({"method": cfg.model.peft.method, "step": last.get("step"),
                    "train_loss": last.get("train_loss"), "eval_loss": last.get("eval_loss"),
                    "test": {task: by_k[0] for task, by_k in scores.items()},
                    "trainable_params": trainable, "total_params": peft.count(params),
                    "trainable_percent": 100.0 * trainable / peft.count(params)}))


def finetune_app(default_config: str, methods: tuple[str, ...], entry_point: str):
  """Defines --config / --workdir and runs `finetune` (one entry point per method)."""
  from absl import flags
  config = cli.ConfigFlag(default_config)
  workdir = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, adapter go here.",
                                required=True)
  cli.run(cli.one_line_errors(lambda argv: finetune(config.value, workdir.value, methods,
                                                     entry_point)), config)
