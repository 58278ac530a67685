"""The command line of every entry point: `--config FILE[:SIZE]` with
`--config.SECTION.FIELD=VALUE` overrides, `--print_config`, `--help` that lists the
config's sizes, and every mistake as one line on stderr with exit status 2 (`--debug` or
LLM_DEBUG=1 shows the traceback instead).

  _CONFIG = cli.ConfigFlag("configs/gpt.py:tiny")   # in the entry point
  @cli.one_line_errors
  def main(argv): ...                                 # reads _CONFIG.value
  if __name__ == "__main__":
    cli.run(main, _CONFIG)

Overrides are applied here rather than by ml_collections' config_flags, whose mistakes
(a typo in a field, an unknown size) surface as tracebacks while flags are defined.
"""

from __future__ import annotations

import ast
import difflib
import errno
import functools
import importlib.util
import os
import re
import sys

from absl import app, flags

from llm import config as config_lib
from llm.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG_ENV = "LLM_DEBUG"
_HELP = ("help", "h", "?", "helpshort", "helpfull")
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
      lost_peer(e)
      raise
  return wrapped


def lost_peer(error: Exception) -> None:
  """In a multi-process job a runtime error in a collective means a peer died (or its
  host went away): say so in one line and exit 1 at once, skipping jax.distributed's
  shutdown barrier, which would wait minutes for the dead process."""
  import jax
  if not isinstance(error, jax.errors.JaxRuntimeError) or jax.process_count() == 1:
    return
  first = str(error).strip().splitlines()[0][:300]
  print(f"error: process {jax.process_index()} of {jax.process_count()} lost a peer ({first});"
        " another process of the job most likely died, see its log; restart the whole job "
        "to resume from the last checkpoint", file=sys.stderr, flush=True)
  os._exit(1)


def run(main, config: ConfigFlag | None = None):
  """absl's app.run with this module's parsing; `main` is wrapped in one_line_errors."""
  app.run(main, flags_parser=one_line_errors(functools.partial(parse, config=config)))


def parse(argv: list[str], config: ConfigFlag | None = None, flag_values=None) -> list[str]:
  """Parses the command line into `config.value` and the absl flags; returns argv[:1]."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  rest, spec, overrides, options = split_args(argv, config is not None)
  if "debug" in options:
    os.environ[DEBUG_ENV] = "1"
  if options & set(_HELP):
    ours = [m for m in flag_values.flags_by_module_dict() if not m.startswith("absl.")]
    print(help_text(sys.modules["__main__"].__doc__, config, spec,
                    "\n".join(flag_values.module_help(m) for m in ours)))
    sys.exit(0)
  if config is not None:
    config.value = load_config(spec or config.default)
    for path, text in overrides:
      apply_override(config.value, path, text)
    if "print_config" in options:
      print(format_config(config_lib.from_configdict(config.value)))
      sys.exit(0)
  positional = flag_values(rest)
  if len(positional) > 1:
    raise ConfigError(f"unexpected argument {positional[1]!r}: flags are --name=value "
                      "(--config FILE[:SIZE] for a config); see --help")
  return positional


def split_args(argv: list[str], takes_config: bool):
  """(argv for absl, the --config spec or None, [(field path, text or None)], options)."""
  rest, spec, overrides, options = [argv[0]], None, [], set()
  args, i = list(argv[1:]), 0
  while i < len(args):
    arg, i = args[i], i + 1
    name, eq, value = arg.partition("=")
    bare = name.lstrip("-")
    if arg == "--":
      rest += args[i - 1:]
      break
    if name.startswith("-") and (bare in _HELP or bare == "debug" or
                                 (takes_config and bare == "print_config")):
      options.add(bare)
    elif takes_config and re.fullmatch(r"--?config", name):
      if not eq and (i == len(args) or args[i].startswith("-")):
        raise ConfigError("--config needs a value: --config FILE[:SIZE], "
                          "e.g. --config configs/gpt.py:tiny")
      spec, i = (value, i) if eq else (args[i], i + 1)
    elif takes_config and re.fullmatch(r"--?(no)?config\.[\w.]+", name):
      path = name.split(".", 1)[1]
      if bare.startswith("no"):
        value, eq = "false", "="
      elif not eq and i < len(args) and not args[i].startswith("--"):
        value, eq, i = args[i], "=", i + 1
      overrides.append((path, value if eq else None))
    else:
      rest.append(arg)
  return rest, spec, overrides, options


def config_files() -> list[str]:
  folder = os.path.join(ROOT, "configs")
  return sorted(f"configs/{f}" for f in os.listdir(folder) if f.endswith(".py") and f[0] != "_")


def _config_module(path: str):
  """The config file at `path` (relative to the working directory, else to the repository)."""
  found = next((p for p in (path, os.path.join(ROOT, path)) if os.path.isfile(p)), None)
  if found is None:
    close = difflib.get_close_matches(path, config_files(), n=1)
    guess = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"--config {path}: no such file{guess}; config files: "
                      f"{', '.join(config_files())}")
  spec = importlib.util.spec_from_file_location("_config_" + re.sub(r"\W", "_", path), found)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec: str):
  """The ConfigDict of `FILE[:SIZE]`; a size the file does not define is one line."""
  path, _, size = spec.partition(":")
  module = _config_module(path)
  sizes = list(getattr(module, "SIZES", ()))
  if size and sizes and size not in sizes:
    close = difflib.get_close_matches(size, sizes, n=1)
    raise ConfigError(f"--config {spec}: unknown size {size!r}"
                      f"{f' (did you mean {close[0]}?)' if close else ''}; "
                      f"{path} has {', '.join(sizes)}")
  return module.get_config(size) if size else module.get_config()


def apply_override(cd, path: str, text: str | None) -> None:
  """Sets `config.<path>` from its command-line text, parsed by the field's type."""
  import ml_collections
  node, keys = cd, path.split(".")
  for depth, key in enumerate(keys):
    where = ".".join(["config"] + keys[:depth])
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"config.{path}: {where} is a field, not a group of fields")
    if key not in node:
      close = difflib.get_close_matches(key, list(node), n=1)
      raise ConfigError(f"{where}.{key}: unknown field"
                        f"{f' (did you mean {where}.{close[0]}?)' if close else ''}; "
                        f"valid fields: {', '.join(sorted(node))}")
    if depth < len(keys) - 1:
      node = node[key]
  if isinstance(node[key], ml_collections.ConfigDict):
    raise ConfigError(f"config.{path} is a group of fields; set one of them, e.g. "
                      f"--config.{path}.{sorted(node[key])[0]}=...")
  node[key] = parse_value(f"config.{path}", text, node.get_type(key), node[key] is None)


def parse_value(name: str, text: str | None, kind: type, optional: bool):
  """`text` as a `kind` (bool, int, float, str, or a tuple literal such as
  data.sources' "(('embedded:topics', 1), ('embedded:docstrings', 3))"); None for "None"
  where the field may be."""
  if text is None and kind is not bool:
    raise ConfigError(f"{name} needs a value: --{name}=VALUE")
  if kind is tuple:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = None
    if not isinstance(value, tuple):
      raise ConfigError(f"{name}={text!r}: expected a tuple, e.g. "
                        "\"(('embedded:topics', 1), ('embedded:docstrings', 3))\"")
    return value
  if optional and text in ("None", "none"):
    return None
  if kind is bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text is not None and text.lower() not in words:
      raise ConfigError(f"{name}={text!r}: expected true or false")
    return True if text is None else words[text.lower()]
  try:
    return kind(text)
  except ValueError:
    expected = {int: "an integer", float: "a number"}[kind]
    raise ConfigError(f"{name}={text!r}: expected {expected}") from None


def format_config(cfg) -> str:
  """Every field as `section.field = value  # description`."""
  rows = config_lib.describe(cfg)
  width = min(40, max(len(f"{name} = {value!r}") for name, value, _ in rows))
  return "\n".join(f"{f'{name} = {value!r}':<{width}}  # {doc}" for name, value, doc in rows)


def help_text(doc: str | None, config: ConfigFlag | None, spec: str | None,
              flags_help: str) -> str:
  lines = [(doc or "").strip(), ""]
  if config is not None:
    spec = spec or config.default
    try:
      sizes = ", ".join(getattr(_config_module(spec.partition(":")[0]), "SIZES", ()))
    except ConfigError as e:
      sizes = str(e)
    lines += [
        f"--config FILE[:SIZE]: the experiment config (default {config.default}).",
        f"  Sizes of {spec.partition(':')[0]}: {sizes or '(see the file)'}.",
        f"  Config files: {', '.join(config_files())}.",
        "--config.SECTION.FIELD=VALUE: override any field (sections: model, data, train,",
        "  parallel), e.g. --config.train.steps=100 --config.model.dtype=bfloat16.",
        "--print_config: print every field with its value and description (the comments",
        "  in llm/config.py), after the overrides, and exit.", ""]
  lines += ["--debug: show the traceback of an error (or set LLM_DEBUG=1).", "",
            flags_help.strip()]
  return "\n".join(lines)
