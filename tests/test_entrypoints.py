"""2-step smoke runs of the entry points, as a user would type them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.d_ff=64",
        "--config.model.vocab_size=512", "--config.data.seq_len=32",
        "--config.data.batch_size=4", "--config.data.max_documents=200",
        "--config.data.num_sentinels=8", "--config.train.peak_flops=1e9",
        "--config.train.num_samples=1", "--config.train.sample_tokens=4"]


def _run(module, *args, cache, cwd=ROOT):
  env = {**os.environ, "LLM_CACHE": cache, "XLA_FLAGS": "--xla_backend_optimization_level=0",
         "JAX_PLATFORMS": "cpu",
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


def _summary(result) -> dict:
  return json.loads(next(l for l in result.stdout.splitlines() if l.startswith("{")))


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_summary_is_the_runs(summary, workdir, keys, vocab=512):
  """The printed losses are the run's last ones in metrics.jsonl, and those of a model
  two steps from its init: about ln(vocab) (near-uniform predictions)."""
  records = _records(workdir)
  assert summary["step"] == 2 == records[-1]["step"]
  for printed, recorded in keys.items():
    value = next(r[recorded] for r in reversed(records) if recorded in r)
    assert summary[printed] == value and abs(value - np.log(vocab)) < 0.3, (printed, value)


def test_pretrain_clm_two_steps(trained, monkeypatch):
  workdir, cache, result = trained
  assert result.returncode == 0, result.stderr[-2000:]
  summary = _summary(result)
  _assert_summary_is_the_runs(summary, workdir, {"train_loss": "train_loss",
                                                 "eval_loss": "eval_loss"})
  assert summary["tokens_per_s"] > 0 and 0 < summary["mfu"]
  # The unigram entropy is that of the evaluation rows' weighted targets, recomputed here.
  from llm import data
  from llm.train import checkpoint as ckpt
  monkeypatch.setenv("LLM_CACHE", cache)  # the run's cached rows: nothing is rebuilt
  cfg = ckpt.read_config(workdir)
  rows = data.build_dataset(cfg.data, data.Tokenizer.load(f"{workdir}/tokenizer.model"),
                            cfg.data.eval_split)
  counts = np.bincount(rows["targets"][rows["weights"] > 0])
  p = counts[counts > 0] / counts.sum()
  assert summary["eval_unigram_entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)
  # One sample (--config.train.num_samples=1), from the first validation document's words.
  from llm.train import loop
  [prompt] = loop.sample_prompts(cfg)
  [sample] = [l for l in result.stdout.splitlines() if l.startswith("--- ")]
  assert len(prompt.split()) == 3 and sample.startswith(f"--- {prompt!r} -> {prompt}")


def test_generate_from_the_workdir_prints_the_greedy_continuation(trained):
  workdir, cache, _ = trained
  result = _run("experiments.generate", "--workdir", workdir, "--prompt", "The",
                "--prompt", "Return", "--max_new_tokens", "4", "--temperature", "0",
                cache=cache)
  assert result.returncode == 0, result.stderr[-2000:]
  # The same continuation, decoded one full forward pass per token here.
  import jax
  from llm import models
  from llm.inference import untrained_ids
  from llm.inference.workdir import continuation_text
  from llm.train import loop
  cfg, params, tokenizer = loop.load(workdir)
  apply = jax.jit(models.build(cfg.model).apply)
  banned = list(untrained_ids(tokenizer))
  want = []
  for prompt in ("The", "Return"):
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    seq = np.zeros((1, 16), np.int32)  # one compiled shape; causal, so the tail is unseen
    seq[0, :len(ids)] = ids
    new = []
    for i in range(len(ids), len(ids) + 4):
      logits = np.array(apply({"params": params}, seq)[0, i - 1])
      logits[banned] = -np.inf
      seq[0, i] = int(np.argmax(logits))
      new.append(int(seq[0, i]))
      if new[-1] == tokenizer.eos_id:
        break
    want.append(prompt + continuation_text(tokenizer, ids, new))
  assert result.stdout.splitlines() == want


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
def test_other_families_two_steps(module, config, trained, tmp_path):
  extra = ["--config.model.num_decoder_layers=1"] if "t5" in config else []
  # The CLM run's cache: the same corpus and tokenizer settings, so nothing is retrained.
  result = _run(module, "--config", config, "--workdir", str(tmp_path / "run"),
                "--config.train.steps=2", *[f for f in TINY if "num_samples" not in f],
                *extra, cache=trained[1])
  assert result.returncode == 0, result.stderr[-2000:]
  keys = ({"train_mlm_loss": "train_loss", "eval_mlm_loss": "eval_loss"} if "mlm" in module
          else {"train_loss": "train_loss", "eval_loss": "eval_loss"})
  _assert_summary_is_the_runs(_summary(result), str(tmp_path / "run"), keys)


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
