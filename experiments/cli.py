"""Every entry point's command line: `--config FILE[:SIZE]`, `--config.SECTION.FIELD=V`
overrides (parsed by llm.config_cli, not ml_collections' config_flags, whose mistakes are
tracebacks raised while flags are defined), `--print_config`, `--help` with the sizes, and
every mistake as one line with exit status 2 (`--debug` or LLM_DEBUG=1: the traceback).
Use: `_CONFIG = cli.ConfigFlag("configs/gpt.py:tiny")`, `@cli.one_line_errors def main`,
and `cli.run(main, _CONFIG)`."""

from __future__ import annotations

import errno
import functools
import os
import re
import sys

from absl import app, flags

from llm import config as config_lib
from llm import config_cli
from llm.config import ConfigError

DEBUG_ENV = "LLM_DEBUG"
_NEWLINES = re.compile(r"\s*\n\s*")


class ConfigFlag:
  """An entry point's `--config`: the FILE[:SIZE] used without one, and (after `run` has
  parsed the command line) `value`, the ConfigDict with the overrides applied."""

  def __init__(self, default: str):
    self.default, self.value = default, None


def one_line_errors(fn):
  """Bad input (ValueError, OSError, flag errors) becomes `error: ...` and exit status 2;
  a diverged run or a full disk exits 1, a preempted run safety.PREEMPTED_EXIT_CODE."""
  from llm.train import safety

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except safety.Preempted as e:
      print(f"stopped: {e}", file=sys.stderr)
      sys.exit(safety.PREEMPTED_EXIT_CODE)
    except (ValueError, OSError, flags.Error, safety.NonFiniteError) as e:
      if os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
        raise
      failed_run = isinstance(e, safety.NonFiniteError) or (
          isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
      message = re.sub(_NEWLINES, " ", str(e).strip())
      if isinstance(e, flags.Error):
        required = re.search(r"Flag (--\w+) must have a value other than None", message)
        message = f"{required.group(1)} is required" if required else message
        message += "; see --help"
      print(f"error: {message}", file=sys.stderr)
      sys.exit(1 if failed_run else 2)
    except Exception as e:  # noqa: BLE001 -- only a multi-process job's lost peer is ours
      from llm import parallel
      if message := parallel.lost_peer_message(e):  # exit at once: jax.distributed's
        print(f"error: {message}", file=sys.stderr, flush=True)  # shutdown barrier would
        os._exit(1)  # wait minutes for the dead process
      raise
  return wrapped


def run(main, config: ConfigFlag | None = None):
  """absl's app.run with this module's parsing; `main` is wrapped in one_line_errors."""
  app.run(main, flags_parser=one_line_errors(functools.partial(parse, config=config)))


def parse(argv: list[str], config: ConfigFlag | None = None, flag_values=None) -> list[str]:
  """Parses the command line into `config.value` and the absl flags; returns argv[:1]."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  rest, spec, overrides, options = config_cli.split_args(argv, config is not None)
  if "debug" in options:
    os.environ[DEBUG_ENV] = "1"
  if options & set(config_cli.HELP_OPTIONS):
    ours = [m for m in flag_values.flags_by_module_dict() if not m.startswith("absl.")]
    print(config_cli.help_text(sys.modules["__main__"].__doc__,
                               config.default if config else None, spec,
                               "\n".join(flag_values.module_help(m) for m in ours)))
    sys.exit(0)
  if config is not None:
    config.value = config_cli.load_config(spec or config.default)
    for path, text in overrides:
      config_cli.apply_override(config.value, path, text)
    if "print_config" in options:
      print(config_cli.format_config(config_lib.from_configdict(config.value)))
      sys.exit(0)
  positional = flag_values(rest)
  if len(positional) > 1:
    raise ConfigError(f"unexpected argument {positional[1]!r}: flags are --name=value "
                      "(--config FILE[:SIZE] for a config); see --help")
  return positional
