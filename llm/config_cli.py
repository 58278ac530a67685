"""The config side of every entry point's command line, kept apart from absl:
`--config FILE[:SIZE]` loaded from a config file, `--config.SECTION.FIELD=VALUE` parsed by
the field's type, `--print_config` and `--help` text. Every mistake is a one-line
ConfigError naming the field and the fix (the closest valid name, the sizes there are).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
import re
from typing import Any

from llm import config as config_lib
from llm.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # configs/ lives here
HELP_OPTIONS = ("help", "h", "?", "helpshort", "helpfull")


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
    if name.startswith("-") and (bare in HELP_OPTIONS or bare == "debug" or
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


def config_module(path: str):
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
  module = config_module(path)
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
  rows = describe(cfg)
  width = min(40, max(len(f"{name} = {value!r}") for name, value, _ in rows))
  return "\n".join(f"{f'{name} = {value!r}':<{width}}  # {doc}" for name, value, doc in rows)


def help_text(doc: str | None, default: str | None, spec: str | None, flags_help: str) -> str:
  """--help: the entry point's docstring, its config's sizes and files, override syntax,
  then absl's text of its flags. `default`: the entry point's config, None if it has none."""
  lines = [(doc or "").strip(), ""]
  if default is not None:
    spec = spec or default
    try:
      sizes = ", ".join(getattr(config_module(spec.partition(":")[0]), "SIZES", ()))
    except ConfigError as e:
      sizes = str(e)
    lines += [
        f"--config FILE[:SIZE]: the experiment config (default {default}).",
        f"  Sizes of {spec.partition(':')[0]}: {sizes or '(see the file)'}.",
        f"  Config files: {', '.join(config_files())}.",
        "--config.SECTION.FIELD=VALUE: override any field (sections: model, data, train,",
        "  parallel), e.g. --config.train.steps=100 --config.model.dtype=bfloat16.",
        "--print_config: print every field with its value and description (the comments",
        "  in llm/config.py), after the overrides, and exit.", ""]
  lines += ["--debug: show the traceback of an error (or set LLM_DEBUG=1).", "",
            flags_help.strip()]
  return "\n".join(lines)


def field_docs(cls) -> dict[str, str]:
  """{field: its one-line description}: the comment on the field's line in the class's source, else
  the comment lines just above it. Documenting a new field is writing that comment."""
  import inspect
  import io
  import tokenize
  lines, _ = inspect.getsourcelines(cls)
  comments = {tok.start[0]: tok.string.lstrip("#").strip() for tok in
              tokenize.generate_tokens(io.StringIO("".join(lines)).readline)
              if tok.type == tokenize.COMMENT}
  names, docs = {f.name for f in dataclasses.fields(cls)}, {}
  for number, line in enumerate(lines, 1):
    match = re.match(r"\s+(\w+):[^=]+=", line)
    if not match or match.group(1) not in names:
      continue
    above, i = [], number - 1
    while i in comments and lines[i - 1].lstrip().startswith("#"):
      above.insert(0, comments[i])
      i -= 1
    docs[match.group(1)] = comments.get(number) or " ".join(above)
  return docs


def describe(cfg, section: str = "") -> list[tuple[str, Any, str]]:
  """(dotted field name, value, description) for every field of `cfg`, nested groups
  flattened: what `--print_config` prints."""
  rows, docs = [], field_docs(type(cfg))
  for f in dataclasses.fields(cfg):
    name, value = f"{section}.{f.name}" if section else f.name, getattr(cfg, f.name)
    if dataclasses.is_dataclass(value):
      rows += describe(value, name)
    else:
      rows.append((name, value, docs.get(f.name, "")))
  return rows
