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
