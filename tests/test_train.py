"""The training loop: loss falls, checkpoints round-trip, resume equals uninterrupted,
and bad input fails with a named one-line error without losing what was written."""

import json
import os

import jax
import numpy as np
import pytest

from llm import config as config_lib
from llm.config import ConfigError
from llm.train import loop
from llm.train import metrics as metrics_lib

MODEL = dict(vocab_size=512, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
             max_len=64, positions="rope", norm="rmsnorm", activation="swiglu",
             use_bias=False, tie_embeddings=False)


def make_config(**train):
  return config_lib.from_configdict({
      "model": MODEL, "data": dict(seq_len=32, batch_size=8, max_documents=300, num_sentinels=8),
      "train": dict(dict(steps=6, warmup_steps=2, learning_rate=1e-2, log_every=1,
                         eval_every=3, eval_batches=2, checkpoint_every=2, peak_flops=1e9),
                    **train),
      "parallel": dict(data=1)})


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("LLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
  monkeypatch.setattr(jax, "devices", lambda *a: jax.local_devices()[:1])  # 1-device mesh


def _losses(workdir):
  return {r["step"]: r["train_loss"] for r in metrics_lib.read_metrics(workdir)
          if "train_loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("LLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    mp.setattr(jax, "devices", lambda *a: jax.local_devices()[:1])
    last = loop.run(make_config(), workdir, progress=False)
  return workdir, last


def test_run_logs_metrics_plots_and_loss_falls(uninterrupted):
  workdir, last = uninterrupted
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 7))
  assert losses[6] < losses[1] - 0.3
  assert "eval_loss" in last and np.isfinite(last["eval_loss"])
  assert os.path.exists(os.path.join(workdir, "loss.png"))
  assert {"tokenizer.model", "config.json", "checkpoints"} <= set(os.listdir(workdir))


def test_checkpoint_round_trip_restores_the_trained_params(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  cfg, params, tokenizer = loop.load(workdir)
  assert cfg == make_config() and tokenizer.vocab_size == MODEL["vocab_size"]
  from llm.models import build
  from llm.train import checkpoint as ckpt
  tokens = np.array([[2, 40, 41, 42]])
  logits = build(cfg.model).apply({"params": params}, tokens)
  fresh, _ = loop.create_state(cfg, loop.parallel.make_mesh(cfg.parallel))
  assert not np.allclose(logits, build(cfg.model).apply({"params": fresh.params}, tokens))
  assert ckpt.manager(workdir, 3).latest_step() == 6


def test_interrupted_then_resumed_run_gives_the_same_losses(uninterrupted, tmp_path,
                                                            monkeypatch):
  workdir = str(tmp_path / "resumed")
  original_write = metrics_lib.MetricsWriter.write

  def crash_at_step_5(self, record):
    if record.get("step") == 5:
      raise KeyboardInterrupt("simulated preemption")
    original_write(self, record)

  monkeypatch.setattr(metrics_lib.MetricsWriter, "write", crash_at_step_5)
  with pytest.raises(KeyboardInterrupt):
    loop.run(make_config(), workdir, progress=False)
  monkeypatch.setattr(metrics_lib.MetricsWriter, "write", original_write)
  assert sorted(_losses(workdir)) == [1, 2, 3, 4]
  loop.run(make_config(), workdir, progress=False)  # resumes from the step-4 checkpoint
  resumed, full = _losses(workdir), _losses(uninterrupted[0])
  assert sorted(resumed) == list(range(1, 7))
  for step in range(1, 7):
    assert resumed[step] == pytest.approx(full[step], abs=1e-5), step


def test_checkpoint_of_a_different_model_is_refused_and_left_intact(uninterrupted):
  workdir, _ = uninterrupted
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  config_before = open(os.path.join(workdir, "config.json")).read()
  other = config_lib.from_configdict({**json.loads(config_lib.to_json(make_config())),
                                      "model": {**MODEL, "d_model": 64}})
  with pytest.raises(ConfigError, match="different model.*model.d_model"):
    loop.run(other, workdir, progress=False)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
  assert open(os.path.join(workdir, "config.json")).read() == config_before


def test_unwritable_workdir_is_a_named_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(ConfigError, match="--workdir .* cannot be written"):
    loop.run(make_config(), str(blocker / "run"), progress=False)


def test_tokenizer_with_a_different_vocabulary_is_refused(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  cfg = config_lib.from_configdict({
      **json.loads(config_lib.to_json(make_config())),
      "model": {**MODEL, "vocab_size": 600},
      "data": {**config_lib.to_dict(make_config().data),
               "tokenizer_path": os.path.join(workdir, "tokenizer.model")}})
  with pytest.raises(ValueError, match="vocab_size"):
    loop.run(cfg, str(tmp_path / "new"), progress=False)


@pytest.mark.parametrize("bad, message", [
    ({"model": {"d_modle": 8}}, "config.model.d_modle: unknown field"),
    ({"model": {"d_model": "big"}}, "config.model.d_model='big': expected an integer"),
    ({"model": {"norm": "batchnorm"}}, "config.model.norm='batchnorm': must be one of"),
    ({"model": {"num_heads": 4, "num_kv_heads": 3}}, "config.model.num_kv_heads=3"),
    ({"trian": {}}, "config.trian: unknown section"),
    ({"data": {"seq_len": 4096}}, "config.data.seq_len=4096 exceeds config.model.max_len"),
    ({"train": {"microbatches": 3}}, "config.train.microbatches=3: must divide"),
])
def test_bad_configs_give_one_line_errors_naming_the_field(bad, message):
  with pytest.raises(ConfigError) as error:
    config_lib.from_configdict(bad)
  assert message in str(error.value) and "\n" not in str(error.value)


def test_a_rerun_says_where_it_resumed_and_logs_replayed_steps_once(uninterrupted, tmp_path):
  import logging
  import shutil
  workdir = str(tmp_path / "copy")
  shutil.copytree(uninterrupted[0], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))  # killed before step 6 was saved
  records = []
  handler = logging.Handler()
  handler.emit = lambda record: records.append(record.getMessage())
  logging.getLogger("llm").addHandler(handler)
  logging.getLogger("llm").setLevel(logging.INFO)
  try:
    loop.run(make_config(), workdir, progress=False)  # replays steps 5 and 6
    assert records == [f"resumed from step 4 of {workdir}"]
    rows = [(r["step"], sorted(r)) for r in metrics_lib.read_metrics(workdir)]
    assert len(rows) == len({(step, tuple(keys)) for step, keys in rows})  # no duplicates
    assert sorted(_losses(workdir)) == list(range(1, 7))
    last = loop.run(make_config(), workdir, progress=False)
  finally:
    logging.getLogger("llm").removeHandler(handler)
  assert records[1:] == ["already at step 6 >= train.steps=6; to train on, raise "
                         "--config.train.steps and pass --config.train.allow_config_change=True"
                         " (the schedule then changes)"]
  assert last["step"] == 6 and last["train_loss"] == _losses(workdir)[6]
  assert last["eval_loss"] == metrics_lib.read_metrics(workdir)[-1]["eval_loss"]


def test_sample_prompts_come_from_the_config_or_the_runs_validation_documents(tmp_path):
  import dataclasses
  from llm import data
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(f"Doc{i} alpha beta gamma delta." for i in range(400)))
  cfg = make_config()
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=f"text:{corpus}"))
  held_out = data.load_documents(cfg.data, cfg.data.eval_split)
  prompts = loop.sample_prompts(cfg)
  assert prompts == [doc.split(" gamma")[0] for doc in held_out[:3]]  # the first 3 words
  assert all(p.startswith("Doc") for p in prompts)
  own = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_samples=2,
                                                           sample_prompts="Hello|Return the|x"))
  assert loop.sample_prompts(own) == ["Hello", "Return the"]
