"""Shared flag handling for the entry points: one-line errors instead of tracebacks."""

import functools
import sys

from llm.config import ConfigError


def one_line_errors(main):
  """Prints ConfigError / ValueError as `error: ...` and exits 2, as users expect of a CLI."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except (ConfigError, ValueError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  return wrapped


def start(config_dict):
  """The start of every training entry point: quiet logs, join a multi-host job if the
  environment describes one, and validate the config at the boundary."""
  from absl import logging

  from llm import config as config_lib
  from llm import parallel
  logging.set_verbosity(logging.WARNING)
  parallel.init_distributed()
  return config_lib.from_configdict(config_dict)
