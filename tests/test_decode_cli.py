"""experiments.generate in-process on tiny models (train.load patched): every strategy,
per-token log-probs, seq2seq and encoder workdirs, and one-line errors for bad input."""

import types

import flax.linen as nn
import jax
import numpy as np
import pytest
from absl import flags

from experiments import generate as generate_exp
from llm import config as config_lib, train
from llm.data.tokenizer import train_tokenizer
from llm.inference import untrained_ids
from llm.models import build

TEXT = ["The quick brown fox jumps over the lazy dog.", "Return the value of x plus one.",
        "A list of numbers: 1, 2, 3 and more words here."] * 20
DECODER = dict(d_model=32, num_layers=1, num_heads=4, d_ff=64, max_len=64)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  vocab = 360
  return (train_tokenizer(TEXT, vocab, path / "a.model", num_sentinels=64),
          train_tokenizer(TEXT[::-1] + ["other words entirely"] * 5, vocab, path / "b.model",
                          num_sentinels=64))


def _workdir(overrides, tokenizer):
  cfg = config_lib.model_from_dict({**DECODER, "vocab_size": tokenizer.vocab_size, **overrides})
  module = build(cfg)
  args = ((np.ones((1, 4), np.int32), np.ones((1, 4), np.int32))
          if cfg.family == "encoder_decoder" else (np.ones((1, 4), np.int32),))
  # Random weights from the param shapes alone: a jitted init would cost a compile each.
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"])
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype), shapes)
  return types.SimpleNamespace(model=cfg), params, tokenizer


@pytest.fixture(scope="module")
def workdirs(tokenizers):
  a, b = tokenizers
  return {"gpt": _workdir({}, a), "draft": _workdir({"num_layers": 1, "d_model": 16}, a),
          "other_tokenizer": _workdir({}, b),
          "t5": _workdir(dict(family="encoder_decoder", positions="relative", norm="rmsnorm",
                              use_bias=False, scale_attention=False), a),
          "bert": _workdir(dict(family="encoder", post_norm=True, embed_norm=True), a)}


@pytest.fixture
def run(workdirs, monkeypatch, capsys):
  monkeypatch.setattr(train, "load", lambda workdir: workdirs[workdir])

  def call(*args):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["generate", *args])
    code = 0
    try:
      generate_exp.main([])
    except SystemExit as e:
      code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
  return call


def _logprob_lines(out):
  return [line.split("\t") for line in out.splitlines() if line.startswith("  ") and "\t" in line]


def test_sampling_prints_log_probs_and_never_untrained_ids(run, tokenizers, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("The quick\nReturn the\n\nA list\n")
  code, out, err = run("--workdir", "gpt", "--prompts_file", str(prompts), "--logprobs",
                       "--max_new_tokens", "24", "--temperature", "1.0")
  assert code == 0, err
  lines = _logprob_lines(out)
  # At most 24 per prompt (fewer where EOS was drawn: about 1 in 300 per step).
  assert 2 * 24 < len(lines) <= 3 * 24 and all(float(l[2]) <= 0 for l in lines)
  # Dozens of near-uniform draws over 360 ids, 66 of them untrained: all avoid them.
  assert not {int(l[0]) for l in lines} & set(untrained_ids(tokenizers[0]))
  assert [l for l in out.splitlines() if not l.startswith("  ")][0].startswith("The quick")


@pytest.mark.parametrize("strategy", [["--beams", "3"], ["--draft_workdir", "draft"],
                                      ["--quant", "int8"]])
def test_beam_speculative_and_quantized_runs(run, strategy):
  code, out, err = run("--workdir", "gpt", "--prompt", "The", "--max_new_tokens", "5",
                       "--temperature", "0", "--logprobs", *strategy)
  assert code == 0, err
  assert len(_logprob_lines(out)) == 5
  assert ("beam_score=" in out) == ("--beams" in strategy)
  assert ("acceptance_rate=" in out) == ("--draft_workdir" in strategy)


def test_seq2seq_generates_and_encoders_refuse(run):
  code, out, err = run("--workdir", "t5", "--prompt", "The quick", "--max_new_tokens", "4")
  assert code == 0, err
  assert out.startswith("The quick -> ")
  code, _, err = run("--workdir", "bert", "--prompt", "The")
  assert code == 2 and err.strip().splitlines()[-1].startswith(
      "error: model.family=encoder: encoder-only models")


@pytest.mark.parametrize("args, message", [
    (["--draft_workdir", "other_tokenizer"], "its tokenizer differs from the target's"),
    (["--draft_workdir", "draft", "--gamma", "0"], "gamma=0: must be >= 1"),
    (["--beams", "0"], "beams=0: must be >= 1"),
    (["--quant", "int3"], "unknown quantization mode"),
    (["--temperature", "nan"], "temperature=nan: must be a finite number >= 0"),
    (["--seed", "-1"], "--seed=-1: must be in [0, 2**32)"),
    (["--seed", str(2 ** 32)], "--seed=4294967296: must be in [0, 2**32)"),
])
def test_bad_input_is_one_line(run, args, message):
  code, _, err = run("--workdir", "gpt", "--max_new_tokens", "2", *args)
  assert code == 2 and message in err.strip().splitlines()[-1]


def test_control_characters_in_printed_text_are_escaped(run, monkeypatch):
  # Byte-fallback pieces can decode to ESC sequences, CR or bidi overrides, which a
  # terminal would obey (clear the screen, overwrite the line, reorder what it shows).
  monkeypatch.setattr(generate_exp, "continuation_text",
                      lambda tokenizer, prompt, new: " made\x1b[2J\rit\u202eup\n\tok")
  monkeypatch.setattr(generate_exp, "generate_sequences",  # what is printed, not sampled
                      lambda *args: types.SimpleNamespace(tokens=np.zeros((1, 2)),
                                                          lists=lambda: [[5, 6]]))
  code, out, err = run("--workdir", "gpt", "--prompt", "Say\x07", "--max_new_tokens", "2",
                       "--temperature", "0")
  assert code == 0, err
  assert out == "Say\\x07 made\\x1b[2J\\rit\\u202eup\n\tok\n"
