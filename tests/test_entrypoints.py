"""2-step smoke runs of the entry points, as a user would type them."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.d_ff=64",
        "--config.model.vocab_size=512", "--config.data.seq_len=32",
        "--config.data.batch_size=4", "--config.data.max_documents=200",
        "--config.data.num_sentinels=8", "--config.train.peak_flops=1e9",
        "--config.train.num_samples=1", "--config.train.sample_tokens=4"]


def _run(module, *args, cache, cwd=ROOT):
  env = {**os.environ, "LLM_CACHE": cache, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": ROOT}  # as `pip install -e .` has it, from any directory
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("clm"))
  cache = str(tmp_path_factory.mktemp("cache"))
  result = _run("experiments.pretrain_clm", "--config", "configs/gpt.py:tiny", "--workdir",
                workdir, "--config.train.steps=2", *TINY, cache=cache)
  return workdir, cache, result


def test_pretrain_clm_two_steps(trained):
  workdir, _, result = trained
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(next(l for l in result.stdout.splitlines() if l.startswith("{")))
  assert summary["step"] == 2 and summary["eval_loss"] > 0
  assert summary["eval_unigram_entropy"] > 0
  assert "---" in result.stdout  # a sample was printed


def test_generate_from_the_workdir(trained):
  workdir, cache, _ = trained
  result = _run("experiments.generate", "--workdir", workdir, "--prompt", "The",
                "--prompt", "Return", "--max_new_tokens", "4", "--temperature", "0",
                cache=cache)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0].startswith("The") and any(l.startswith("Return") for l in lines)


def test_bad_flags_fail_with_one_line_and_no_traceback(trained, tmp_path):
  workdir, cache, _ = trained
  for module, args, message in [
      ("experiments.generate", ["--top_p", "1.5"], "error: top_p=1.5: must be in (0, 1]"),
      ("experiments.pretrain_clm", ["--config.model.foo=1"],
       "error: config.model.foo: unknown field; valid fields: activation, d_ff,")]:
    result = _run(module, "--workdir", workdir, *args, cache=cache, cwd=str(tmp_path))
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1
  # From another directory the default config is found, and --print_config needs no workdir.
  result = _run("experiments.pretrain_clm", "--print_config", "--config.train.steps=3",
                cache=cache, cwd=str(tmp_path))
  assert result.returncode == 0 and "train.steps = 3 " in result.stdout, result.stderr


@pytest.mark.parametrize("module, config", [("experiments.pretrain_mlm", "configs/bert.py:tiny"),
                                            ("experiments.pretrain_t5", "configs/t5.py:tiny")])
def test_other_families_two_steps(module, config, tmp_path):
  extra = ["--config.model.num_decoder_layers=1"] if "t5" in config else []
  result = _run(module, "--config", config, "--workdir", str(tmp_path / "run"),
                "--config.train.steps=2", *[f for f in TINY if "max_documents" not in f
                                            and "num_samples" not in f], *extra,
                "--config.data.max_documents=400", cache=str(tmp_path / "cache"))
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(next(l for l in result.stdout.splitlines() if l.startswith("{")))
  assert summary["step"] == 2


def test_lora_then_evaluate_with_the_adapter(trained, tmp_path):
  workdir, cache, _ = trained
  tuned = str(tmp_path / "lora")
  result = _run("experiments.lora", "--config", "configs/finetune.py:lora", "--workdir", tuned,
                f"--config.train.init_from={workdir}", "--config.train.steps=2",
                "--config.data.seq_len=32", "--config.data.batch_size=4",
                "--config.data.tasks=facts", "--config.train.peak_flops=1e9", cache=cache)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(next(l for l in result.stdout.splitlines() if l.startswith("{")))
  assert summary["method"] == "lora" and summary["step"] == 2
  assert 0 < summary["trainable_params"] < summary["total_params"]
  assert "exact_match" in summary["test"]["facts"]
  result = _run("experiments.evaluate", "--workdir", workdir, "--adapter", f"{tuned}/adapter",
                "--tasks", "facts", "--max_examples", "4", "--lm_source", "",
                "--out", str(tmp_path / "eval"), cache=cache)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "facts 0-shot exact_match" in result.stdout
  assert json.load(open(tmp_path / "eval" / "results.json"))[f"{tuned}/adapter"]["tasks"]
  # A method the entry point does not train is refused before anything runs.
  result = _run("experiments.lora", "--config", "configs/finetune.py:full", "--workdir",
                str(tmp_path / "x"), f"--config.train.init_from={workdir}", cache=cache)
  assert result.returncode == 2
  assert "error: config.model.peft.method='full': experiments.lora trains lora" in result.stderr
  assert not (tmp_path / "x").exists()


def test_quantized_inference_prints_the_comparison_and_saves_a_checkpoint(trained, tmp_path):
  from llm.inference import quantize as quant_lib
  workdir, cache, _ = trained
  saved = str(tmp_path / "int8")
  result = _run("experiments.quantized_inference", "--workdir", workdir, "--quant", "int8",
                "--eval_rows", "8", "--new_tokens", "4", "--repeats", "1", "--batches", "1",
                "--save_quantized", saved, "--prompt", "The", cache=cache)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[0].split()[:3] == ["mode", "param", "MB"]
  none, int8 = (l.split() for l in lines[1:3])
  assert none[0] == "none" and int8[0] == "int8" and float(int8[2][:-1]) > 2.0
  assert abs(float(int8[4][:-1])) < 1.0  # perplexity within 1%
  assert any(l.startswith("[int8] The") for l in lines)
  assert quant_lib.restore(saved, "int8")["embed"]["embedding"].bits == 8
  result = _run("experiments.quantized_inference", "--workdir", workdir, "--quant", "int4",
                "--from_quantized", saved, cache=cache)
  assert result.returncode != 0
  assert "holds a int8 checkpoint, not int4" in result.stderr.strip().splitlines()[-1]
