"""Bad input as a new user types it: each case fails with one line that names the field
or flag and the fix. Parsing runs in-process on its own absl FlagValues (no jax compile).

`python tests/test_bad_inputs.py` prints the rows of docs/bad_inputs.md for these cases.
"""

import json
import os
import sys

import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # as `python -m pytest` from the root has it, for the __main__ use

from experiments import cli  # noqa: E402
from llm import config as config_lib, config_cli, parallel  # noqa: E402
from llm.config import ConfigError  # noqa: E402
from llm.train import checkpoint as ckpt  # noqa: E402

# (what the user typed after `python -m experiments.pretrain_clm`, start of the message)
OVERRIDES = [
    ("--config.model.d_modle=64", "config.model.d_modle: unknown field (did you mean "
     "config.model.d_model?); valid fields: activation,"),
    ("--config.trian.steps=5", "config.trian: unknown field (did you mean config.train?)"),
    ("--config.model.moe.experts=4", "config.model.moe.experts: unknown field (did you mean "
     "config.model.moe.num_experts?)"),
    ("--config.train.steps=abc", "config.train.steps='abc': expected an integer"),
    ("--config.train.steps=1.5", "config.train.steps='1.5': expected an integer"),
    ("--config.train.learning_rate=fast", "config.train.learning_rate='fast': expected a number"),
    ("--config.model.use_bias=maybe", "config.model.use_bias='maybe': expected true or false"),
    ("--config.model=3", "config.model is a group of fields; set one of them"),
    ("--config.model.d_model.size=3", "config.model.d_model.size: config.model.d_model is a "
     "field, not a group"),
    ("--config.train.steps", "config.train.steps needs a value: --config.train.steps=VALUE"),
    ("--config.model.norm=batchnorm", "config.model.norm='batchnorm': must be one of"),
    ("--config.model.vocab_size=0", "config.model.vocab_size=0: must be >= 1"),
    ("--config.model.num_heads=0", "config.model.num_heads=0: must be >= 1"),
    ("--config.model.num_layers=-2", "config.model.num_layers=-2: must be >= 1"),
    ("--config.model.num_kv_heads=-1", "config.model.num_kv_heads=-1: must be >= 0"),
    ("--config.model.num_kv_heads=3", "config.model.num_kv_heads=3: must divide num_heads=4"),
    ("--config.model.d_model=130", "config.model.d_model=130 is not divisible by num_heads=4"),
    ("--config.model.dropout=1.0", "config.model.dropout=1.0: must be in [0, 1)"),
    ("--config.model.dropout=-0.1", "config.model.dropout=-0.1: must be in [0, 1)"),
    ("--config.model.norm_eps=0", "config.model.norm_eps=0.0: must be > 0"),
    ("--config.model.init_std=-1", "config.model.init_std=-1.0: must be > 0"),
    ("--config.model.rope_theta=0", "config.model.rope_theta=0.0: must be > 0"),
    ("--config.model.relative_buckets=2", "config.model.relative_buckets=2: must be >= 4"),
    ("--config.model.positions=relative", "config.model.positions='relative' is T5's bias, "
     "which only family=encoder_decoder implements; for family='decoder' use rope"),
    ("--config.model.family=encoder --config.model.positions=relative",
     "config.model.positions='relative' is T5's bias, which only family=encoder_decoder "
     "implements; for family='encoder'"),
    ("--config.model.moe.every=0", "config.model.moe.every=0: must be >= 1"),
    ("--config.model.moe.capacity_factor=0", "config.model.moe.capacity_factor=0.0: must be > 0"),
    ("--config.model.moe.aux_loss_weight=-1",
     "config.model.moe.aux_loss_weight=-1.0: must be >= 0"),
    ("--config.model.moe.num_experts=4 --config.model.moe.top_k=8",
     "config.model.moe.top_k=8: must be in [1, num_experts=4]"),
    ("--config.model.peft.lora_rank=0", "config.model.peft.lora_rank=0: must be >= 1"),
    ("--config.model.peft.lora_dropout=1.5",
     "config.model.peft.lora_dropout=1.5: must be in [0, 1)"),
    ("--config.model.peft.lora_targets=(", "config.model.peft.lora_targets='(': not a regex"),
    ("--config.model.family=encoder --config.model.peft.method=prefix",
     "config.model.peft.method='prefix' needs model.family='decoder'"),
    ("--config.data.seq_len=1", "config.data.seq_len=1: must be >= 2"),
    ("--config.data.seq_len=4096", "config.data.seq_len=4096 exceeds config.model.max_len=256"),
    ("--config.data.batch_size=0", "config.data.batch_size=0: must be >= 1"),
    ("--config.data.shuffle_seed=-1", "config.data.shuffle_seed=-1: must be in [0, 2**32)"),
    ("--config.data.mlm_probability=1.0", "config.data.mlm_probability=1.0: must be in (0, 1)"),
    ("--config.data.mlm_mask_ratio=0.95", "config.data.mlm_mask_ratio=0.95 + mlm_random_ratio=0.1: "
     "must be <= 1"),
    ("--config.data.noise_density=0", "config.data.noise_density=0.0: must be in (0, 1)"),
    ("--config.data.mean_span_length=0.5", "config.data.mean_span_length=0.5: must be >= 1"),
    ("--config.data.eval_split=train", "config.data.eval_split='train' is also "
     "config.data.train_split: evaluating on the training data hides overfitting"),
    ("--config.data.encoding=klingon", "config.data.encoding='klingon': not a text encoding"),
    ("--config.data.encoding=base64", "config.data.encoding='base64': not a text encoding"),
    ("--config.data.objective=mlm", "config.data.objective='mlm' trains a encoder model, but "
     "config.model.family='decoder'"),
    ("--config.data.objective=gpt", "config.data.objective='gpt': must be one of"),
    ("--config.train.steps=0", "config.train.steps=0: must be >= 1"),
    ("--config.train.learning_rate=inf", "config.train.learning_rate=inf: must be a finite number"),
    ("--config.train.learning_rate=nan", "config.train.learning_rate=nan: must be a finite number"),
    ("--config.train.learning_rate=0", "config.train.learning_rate=0.0: must be > 0"),
    ("--config.train.b1=1.0", "config.train.b1=1.0: must be in [0, 1)"),
    ("--config.train.b2=-0.1", "config.train.b2=-0.1: must be in [0, 1)"),
    ("--config.train.eps=0", "config.train.eps=0.0: must be > 0"),
    ("--config.train.grad_clip=-1", "config.train.grad_clip=-1.0: must be > 0"),
    ("--config.train.min_lr_ratio=-2", "config.train.min_lr_ratio=-2.0: must be in [0, 1]"),
    ("--config.train.weight_decay=-0.1", "config.train.weight_decay=-0.1: must be >= 0"),
    ("--config.train.warmup_steps=-1", "config.train.warmup_steps=-1: must be >= 0"),
    ("--config.train.log_every=0", "config.train.log_every=0: must be >= 1"),
    ("--config.train.eval_every=0", "config.train.eval_every=0: must be >= 1"),
    ("--config.train.checkpoint_every=0", "config.train.checkpoint_every=0: must be >= 1"),
    ("--config.train.eval_batches=0", "config.train.eval_batches=0: must be >= 1"),
    ("--config.train.keep_checkpoints=0", "config.train.keep_checkpoints=0: must be >= 1"),
    ("--config.train.microbatches=3", "config.train.microbatches=3: must divide "
     "data.batch_size=16"),
    ("--config.train.seed=-1", "config.train.seed=-1: must be in [0, 2**32)"),
    ("--config.train.seed=4294967296", "config.train.seed=4294967296: must be in [0, 2**32)"),
    ("--config.train.peak_flops=-1", "config.train.peak_flops=-1.0: must be >= 0"),
    ("--config.train.sample_tokens=300", "config.train.sample_tokens=300: a prompt plus the "
     "samples must fit model.max_len=256"),
    ("--config.train.trainable=[", "config.train.trainable='[': not a regex"),
    ("--config.parallel.data=0", "config.parallel.data=0: must be -1 (the devices the other "
     "axes leave) or >= 1"),
    ("--config.parallel.fsdp=0", "config.parallel.fsdp=0: must be -1 (the devices the other "
     "axes leave) or >= 1"),
    ("--config.parallel.expert=0", "config.parallel.expert=0: must be -1 (the devices the "
     "other axes leave) or >= 1"),
    ("--config.parallel.fsdp=-1", "config.parallel data=-1 fsdp=-1 tensor=1 expert=1: only one "
     "axis may be -1"),
]

# Whole command lines (the workdir flag included where it matters) through the parser.
COMMAND_LINES = [
    ("--config configs/gpt.py:tinyy --workdir w", "--config configs/gpt.py:tinyy: unknown size "
     "'tinyy' (did you mean tiny?); configs/gpt.py has tiny, small, gpt2, llama"),
    ("--config configs/gptt.py --workdir w", "--config configs/gptt.py: no such file (did you "
     "mean configs/gpt.py?); config files: configs/align.py, configs/bert.py,"),
    ("--workdir w --config", "--config needs a value: --config FILE[:SIZE]"),
    ("--config.train.steps=5", "--workdir is required; see --help"),
    ("--workdir w configs/gpt.py:tiny", "unexpected argument 'configs/gpt.py:tiny': flags are "
     "--name=value"),
    ("--workdir w --worcdir x", "Unknown command line flag 'worcdir'. Did you mean: workdir ?"),
    ("--workdir w --steps_per_log many", "flag --steps_per_log=many: invalid literal for int()"),
]


def _flag_values():
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Where the run goes.", required=True, flag_values=fv)
  flags.DEFINE_integer("steps_per_log", 1, "An integer flag.", flag_values=fv)
  return fv


def _parse(command_line: str, default="configs/gpt.py:tiny"):
  config = cli.ConfigFlag(default)
  rest = cli.parse(["prog", *command_line.split()], config, _flag_values())
  return config, rest


def _one_line_error(capsys, fn, *args) -> str:
  with pytest.raises(SystemExit) as exit_:
    cli.one_line_errors(fn)(*args)
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
  assert err.startswith("error: ") and "Traceback" not in err
  return err.strip()[len("error: "):]


def _validate(command_line: str):
  config, _ = _parse(f"--workdir w {command_line}")
  return config_lib.check_sampling(config_lib.from_configdict(config.value))  # as start does


@pytest.mark.parametrize("command_line, message", OVERRIDES)
def test_a_bad_override_is_one_line_naming_the_field(command_line, message, capsys):
  assert message in _one_line_error(capsys, _validate, command_line)


@pytest.mark.parametrize("command_line, message", COMMAND_LINES)
def test_a_bad_command_line_is_one_line(command_line, message, capsys):
  assert message in _one_line_error(capsys, _parse, command_line)


def test_good_overrides_parse_by_field_type_and_the_config_is_found_from_anywhere(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # configs/ is found next to experiments/, not in the cwd
  config, rest = _parse("--workdir w --config configs/t5.py:tiny --config.train.steps 7 "
                        "--config.parallel.data -1 --noconfig.model.use_bias "
                        "--config.model.scan_layers --config.data.data_dir=None "
                        "--config.train.learning_rate=1e-3 --config.data.source=text:a.txt")
  cfg = config_lib.from_configdict(config.value)
  assert rest == ["prog"] and cfg.model.family == "encoder_decoder"
  assert (cfg.train.steps, cfg.parallel.data, cfg.model.use_bias, cfg.model.scan_layers,
          cfg.data.data_dir, cfg.train.learning_rate, cfg.data.source) == (
              7, -1, False, True, None, 1e-3, "text:a.txt")


def test_print_config_lists_every_field_with_its_value_and_description(capsys):
  with pytest.raises(SystemExit) as exit_:
    _parse("--print_config --config.train.steps=7")  # no --workdir needed to look
  out = capsys.readouterr().out.splitlines()
  assert exit_.value.code == 0
  names = [name for name, _, _ in config_cli.describe(config_lib.Config())]
  assert [line.split(" = ")[0] for line in out] == names
  assert "train.steps = 7" in out[names.index("train.steps")]
  assert all(len(line.split("  # ", 1)[1]) > 8 for line in out)  # a description each


def test_every_config_field_has_a_description():
  rows = config_cli.describe(config_lib.Config())
  assert len(rows) > 80 and [name for name, _, doc in rows if len(doc) < 8] == []


def test_help_lists_sizes_override_syntax_and_where_fields_are_documented(capsys):
  with pytest.raises(SystemExit) as exit_:
    _parse("--help --config configs/t5.py")
  out = capsys.readouterr().out
  assert exit_.value.code == 0
  assert "Sizes of configs/t5.py: tiny, small." in out and "configs/moe.py" in out
  assert "--config.SECTION.FIELD=VALUE" in out and "llm/config.py" in out
  assert "--print_config" in out and "--debug" in out and "--workdir" in out


def test_debug_shows_the_traceback(monkeypatch):
  monkeypatch.setenv(cli.DEBUG_ENV, "0")  # restored after the test, as --debug sets it
  with pytest.raises(ConfigError, match="unknown size"):
    cli.one_line_errors(_parse)("--debug --workdir w --config configs/gpt.py:tinyy")
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  with pytest.raises(ConfigError, match="expected an integer"):
    cli.one_line_errors(_validate)("--config.train.steps=x")


@pytest.mark.parametrize("content, message", [
    (b"{not json", "its config.json is not a training config (Expecting property name"),
    (json.dumps({"model_type": "gpt2", "n_embd": 768}).encode(),
     "its config.json is not a training config (no model section); use a new --workdir "
     "(a Hugging Face checkpoint directory goes in --config.train.init_from)"),
    (b"\xff\xfe\x00garbage", "its config.json is not a training config ("),
    (json.dumps({"model": {"d_modle": 3}}).encode(), "its config.json does not fit this "
     "version of the code (config.model.d_modle: unknown field"),
])
def test_a_foreign_or_corrupt_workdir_config_is_one_line(content, message, tmp_path, capsys):
  (tmp_path / "config.json").write_bytes(content)
  said = _one_line_error(capsys, ckpt.read_config, str(tmp_path))
  assert said.startswith(f"--workdir {tmp_path}: {message}"), said
  if b"model" not in content:  # training into it is refused the same way
    said = _one_line_error(capsys, ckpt.check_config, str(tmp_path), config_lib.Config(),
                           False)
    assert said.startswith(f"--workdir {tmp_path}: {message}"), said


def test_the_mesh_error_counts_right_and_says_how_to_simulate_devices(capsys):
  message = _one_line_error(capsys, parallel.mesh_shape, config_lib.ParallelConfig(fsdp=8), 1)
  assert ("needs a multiple of fsdp x tensor = 8 devices (data=-1 takes the rest), but 1 is "
          "present") in message
  assert message.endswith("XLA_FLAGS=--xla_force_host_platform_device_count=8")
  message = _one_line_error(capsys, parallel.mesh_shape,
                            config_lib.ParallelConfig(data=2, fsdp=2), 8)
  assert "needs data x fsdp x tensor = 4 devices, but 8 are present" in message
  assert parallel.mesh_shape(config_lib.ParallelConfig(fsdp=2), 8) == (4, 2, 1, 1)
  message = _one_line_error(capsys, parallel.mesh_shape,
                            config_lib.ParallelConfig(data=1, fsdp=-1, expert=4), 2)
  assert "needs a multiple of data x tensor x expert = 4 devices (fsdp=-1 takes the rest)" \
      in message


def test_hugging_face_loading_says_what_to_install(tmp_path, monkeypatch, capsys):
  from llm import convert
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
  message = _one_line_error(capsys, convert.load_pretrained, str(tmp_path))
  assert "need transformers, which the runtime requirements leave out: pip install " \
         "'transformers>=4.57,<6'" in message


def test_sampling_flags_out_of_range(capsys):
  from llm.inference import SamplingConfig
  for temperature in (float("nan"), float("inf"), -1.0):
    assert "must be a finite number >= 0" in _one_line_error(
        capsys, lambda t: SamplingConfig(temperature=t), temperature)
  for seed in (-1, 2 ** 32):
    assert f"--seed={seed}: must be in [0, 2**32)" in _one_line_error(
        capsys, lambda s: config_lib.check_range("--seed", s, "[0, 2**32)"), seed)
  config_lib.check_range("--seed", 2 ** 32 - 1, "[0, 2**32)")


def test_range_specs_match_their_intervals():
  cases = {"> 0": [(0, False), (1e-9, True)], ">= 1": [(0, False), (1, True)],
           ">= 0": [(-1, False), (0, True)], ">= 2": [(1, False), (2, True)],
           ">= 4": [(3, False), (4, True)],
           "[0, 1)": [(0, True), (1, False), (-1e-9, False), (float("nan"), False)],
           "(0, 1)": [(0, False), (0.5, True), (1, False)], "[0, 1]": [(1, True), (1.01, False)],
           "[0, 2**32)": [(2 ** 32 - 1, True), (2 ** 32, False)]}
  for spec, values in cases.items():
    assert [config_lib.in_range(v, spec) for v, _ in values] == [ok for _, ok in values], spec
  for spec in set(config_lib.RANGES.values()):
    assert spec in cases, spec  # every spec in the table is one tested here


def test_defaults_and_every_config_size_are_valid():
  config_lib.from_configdict({})
  for spec in ["configs/gpt.py:" + s for s in ("tiny", "small", "gpt2", "llama")] + [
      "configs/bert.py:tiny", "configs/bert.py:roberta", "configs/t5.py:small",
      "configs/moe.py:mixtral", "configs/finetune.py:prompt"]:
    config_lib.from_configdict(config_cli.load_config(spec))


def test_the_package_installs_llm_experiments_and_configs_with_the_runtime_requirements():
  import tomllib
  import setuptools
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)
  find = project["tool"]["setuptools"]["packages"]["find"]
  packages = setuptools.find_namespace_packages(ROOT, include=find["include"])
  assert {"llm", "llm.train", "llm.inference", "experiments", "configs"} <= set(packages)
  assert not {p for p in packages if p.startswith(("tests", "benchmarks"))}
  assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]


def test_the_bad_input_table_lists_every_case_here():
  with open(os.path.join(ROOT, "docs", "bad_inputs.md"), encoding="utf-8") as f:
    table = f.read()
  for given, said, test in table_rows():
    assert f"| {given} | {said.replace('|', '&#124;')} | `tests/test_bad_inputs.py::{test}` |" \
        in table, given


def table_rows():
  """(input, message, test) for docs/bad_inputs.md, from running each case."""
  import io
  from contextlib import redirect_stderr

  def message(fn, *args):
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit):
      cli.one_line_errors(fn)(*args)
    return err.getvalue().strip()[len("error: "):]
  rows = [(f"`{line}`", message(_validate, line),
           "test_a_bad_override_is_one_line_naming_the_field") for line, _ in OVERRIDES]
  rows += [(f"`{line}`", message(_parse, line), "test_a_bad_command_line_is_one_line")
           for line, _ in COMMAND_LINES]
  return rows


if __name__ == "__main__":  # the table's rows for the cases above
  for given, said, test in table_rows():
    print(f"| {given} | {said.replace('|', '&#124;')} | `tests/test_bad_inputs.py::{test}` |")
