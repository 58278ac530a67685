"""Sweeps: expansion, validation before any run, the Optuna-backed runner (complete,
skip, retry, resume, exclusive claims), the report and the IsoFLOP fit."""

import json
import math
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from llm import config as config_lib, scaling
from llm.config import ConfigError
from llm.sweep import chain, isoflop, product, report, results, runner, spec, study, sweep, zipit
from llm.sweep import worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_FILE = textwrap.dedent('''
    from configs import gpt
    from llm.sweep import sweep

    def get_config(arg=""):
      cfg = gpt.get_config("tiny")
      cfg.model.update(dict(d_model=32, num_layers=1, d_ff=64, vocab_size=512, max_len=32,
                            scan_layers=False))  # one layer: unrolled compiles faster
      cfg.data.update(dict(seq_len=32, batch_size=4, max_documents=200, num_sentinels=8))
      cfg.train.update(dict(steps=2, log_every=1, eval_every=1, checkpoint_every=1,
                            eval_batches=1, warmup_steps=1, peak_flops=1e9))
      return cfg

    def get_sweep(arg=""):
      # Host-side fields only: the three trials share one compiled train step.
      trials = sweep("data.shuffle_seed", [0, 1, 2])
      trials.append({"name": "broken", "data.source": "text:/nonexistent/*.txt"})
      if arg == "more":
        trials.append({"name": "resumed", "data.shuffle_seed": 2})
      if arg == "typo":
        trials.append({"model.d_modle": 64})
      return trials
''')


# --- expansion and names (pure python) ---------------------------------------------------

def test_product_zip_chain_and_names():
  grid = product(sweep("model.num_layers", [2, 4]), sweep("train.learning_rate", [1e-3, 3e-3]))
  assert grid == [{"model.num_layers": 2, "train.learning_rate": 1e-3},
                  {"model.num_layers": 2, "train.learning_rate": 3e-3},
                  {"model.num_layers": 4, "train.learning_rate": 1e-3},
                  {"model.num_layers": 4, "train.learning_rate": 3e-3}]
  pairs = zipit(sweep("model.d_model", [64, 128]), sweep("model.num_layers", [8, 2]))
  assert pairs == [{"model.d_model": 64, "model.num_layers": 8},
                   {"model.d_model": 128, "model.num_layers": 2}]
  both = chain(grid, pairs, [{"name": "baseline"}])
  names = [spec.trial_name(t) for t in both]
  assert names[0] == "num_layers=2,learning_rate=0.001" and names[-1] == "baseline"
  assert len(set(names)) == len(names) == 7
  assert names == [spec.trial_name(t) for t in chain(grid, pairs, [{"name": "baseline"}])]
  # The last key part names a field unless two fields share it.
  assert spec.trial_name({"model.dropout": 0.1, "train.dropout": 0.2}) == \
      "model.dropout=0.1,train.dropout=0.2"
  long_a, long_b = ({"data.source": f"text:/{'x' * 200}{i}.txt"} for i in "ab")
  assert len(spec.trial_name(long_a)) <= 96 and spec.trial_name(long_a) != spec.trial_name(long_b)
  assert spec.tags({"tag.budget": 1e12, "train.steps": 3}) == {"budget": 1e12}
  assert spec.overrides({"tag.budget": 1e12, "name": "x", "train.steps": 3}) == {"train.steps": 3}
  with pytest.raises(ValueError, match="different lengths"):
    zipit(sweep("a.b", [1, 2]), sweep("a.c", [1]))
  with pytest.raises(ValueError, match="set by two combined groups"):
    product(sweep("a.b", [1]), sweep("a.b", [2]))


def test_bad_sweeps_fail_before_any_trial_runs(tmp_path):
  path = tmp_path / "s.py"
  path.write_text(SWEEP_FILE)
  base, trials, _, _ = spec.load_sweep_file(f"{path}:typo")
  target = str(tmp_path / "sweep")
  with pytest.raises(ConfigError, match=r"sweep trial 'd_modle=64': config.model.d_modle: "
                                        r"unknown field; valid fields: .*d_model"):
    runner.prepare(f"{path}:typo", base, trials, target, {})
  assert not os.path.exists(target)  # nothing was written, let alone run
  with pytest.raises(ValueError, match="the sweep has no trials"):
    spec.expand(base, [])
  with pytest.raises(ValueError, match="have the same name 'x'"):
    spec.expand(base, [{"name": "x"}, {"name": "x", "train.steps": 3}])
  with pytest.raises(ConfigError, match="sweep trial 'steps=0': config.train.steps=0: must be"):
    spec.expand(base, [{"train.steps": 0}])
  with pytest.raises(ConfigError, match="config.train.steps='many'"):
    spec.expand(base, [{"train.steps": "many"}])
  # A directory holding another sweep (or anything else) is refused.
  runner.record(target, runner.prepare(str(path), base, trials[:2], target, {}))
  with pytest.raises(ValueError, match="holds another sweep .*trial 'shuffle_seed=0' is "
                                       r"defined differently\); use a new --workdir"):
    runner.prepare(str(path), base, [{"name": "shuffle_seed=0", "train.steps": 5}], target, {})
  with pytest.raises(ValueError, match="is not empty and holds no sweep.json"):
    runner.prepare(str(path), base, trials[:2], str(tmp_path), {})
  # An unreachable storage fails in seconds, naming the URL, before the sweep is recorded.
  fresh = str(tmp_path / "fresh")
  definition = runner.prepare(str(path), base, trials[:2], fresh, {})
  for url in ("sqlite:////nonexistent_dir/sweep.db", "postgresql://u@127.0.0.1:9/db"):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"--storage {url}: cannot be reached"):
      runner.launch(fresh, definition, url)
    assert time.perf_counter() - start < 30  # no retrying for minutes; loose for busy machines
  assert not os.path.exists(fresh)


# --- the runner, end to end ---------------------------------------------------------------

def _worker_env(cache):
  # One device; XLA's backend optimisations off halves the compile time of the steps.
  return {"LLM_CACHE": cache, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": "--xla_backend_optimization_level=0",
          "JAX_COMPILATION_CACHE_DIR": os.path.join(cache, "jax"),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _sweep_cli(config, workdir, *flags, cache):
  return subprocess.run([sys.executable, "-m", "experiments.sweep", "--config", config,
                         "--workdir", workdir, *flags], cwd=ROOT,
                        env={**os.environ, **_worker_env(cache)}, capture_output=True,
                        text=True, timeout=600)


def _attempts(workdir):
  import optuna
  s = optuna.load_study(study_name=os.path.basename(workdir),
                        storage=study.default_storage(workdir))
  return [(t.user_attrs["trial"], t.user_attrs["attempt"], t.state.name) for t in s.trials]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep")
  (root / "s.py").write_text(SWEEP_FILE)
  workdir, cache = str(root / "runs"), str(root / "cache")
  result = _sweep_cli(str(root / "s.py"), workdir, "--workers", "1", cache=cache)
  return root, workdir, cache, result


def test_three_trials_complete_one_fails_and_is_recorded(first_run):
  _, workdir, _, result = first_run
  assert result.returncode == 1, result.stderr[-3000:]  # one trial failed
  assert "trials: {'complete': 3, 'failed': 1}" in result.stdout
  assert sorted(_attempts(workdir)) == [("broken", 1, "FAIL"), ("shuffle_seed=0", 1, "COMPLETE"),
                                        ("shuffle_seed=1", 1, "COMPLETE"),
                                        ("shuffle_seed=2", 1, "COMPLETE")]
  assert len({int(l.split("pid ")[1].rstrip(")")) for l in result.stderr.splitlines()
              if ": started (optuna trial" in l}) == 1  # one worker ran them all
  broken = results.trial_status(os.path.join(workdir, "broken"))
  assert broken["status"] == "failed" and "no file matches" in broken["error"]
  assert "Traceback" in open(os.path.join(workdir, "broken", worker.ERROR_FILE)).read()
  losses = set()
  for seed in range(3):
    summary = results.summarize_workdir(os.path.join(workdir, f"shuffle_seed={seed}"))
    assert summary["step"] == 2 and summary["tokens"] == 2 * 4 * 32
    losses.add(summary["eval_loss"])
  assert len(losses) == 3  # different data order, different runs
  table = open(os.path.join(workdir, report.CSV_FILE)).read().splitlines()
  assert len(table) == 5 and table[0].startswith("trial,status,data.shuffle_seed,data.source")


def test_rerun_skips_finished_resumes_interrupted_and_retries_failed(first_run, monkeypatch,
                                                                     capfd):
  """A worker "killed" after trial `resumed`'s first checkpoint is simulated by copying a
  finished trial's workdir without its last checkpoint and recording an interrupted
  attempt; the rerun must resume it, not restart it, and leave finished trials alone."""
  root, workdir, cache, _ = first_run
  config = f"{root / 's.py'}:more"
  base, trials, _, _ = spec.load_sweep_file(config)
  definition = runner.prepare(config, base, trials, workdir, {})
  source, target = (os.path.join(workdir, n) for n in ("shuffle_seed=2", "resumed"))
  shutil.copytree(source, target, ignore=shutil.ignore_patterns(results.STATUS_FILE))
  shutil.rmtree(os.path.join(target, "checkpoints", "2"))
  records = results.read_metrics(source)
  with open(os.path.join(target, results.METRICS_FILE), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records if r["step"] == 1)
  handle = study.open_study(study.open_storage(study.default_storage(workdir)),
                            runner.study_name(workdir), runner.hashes(definition))
  assert study.enqueue_due(handle, ["resumed"], workdir)["resumed"] == "new"
  number, name = study.claim(handle, workdir)
  assert name == "resumed"
  study.fail(handle, number, None)
  finished = {n: open(os.path.join(workdir, n, results.METRICS_FILE)).read()
              for n in ("shuffle_seed=0", "shuffle_seed=1", "shuffle_seed=2")}

  # The launcher in this process (the CLI was tested above); its workers are spawned.
  for key, value in _worker_env(cache).items():
    monkeypatch.setenv(key, value)
  capfd.readouterr()
  states = runner.launch(workdir, definition, retry_failed=True)
  assert states == {"shuffle_seed=0": "complete", "shuffle_seed=1": "complete",
                    "shuffle_seed=2": "complete", "broken": "failed", "resumed": "complete"}
  started = [l.split("trial ")[1].split(":")[0] for l in capfd.readouterr().err.splitlines()
             if ": started (optuna trial" in l]
  assert sorted(started) == ["broken", "resumed"]
  for name, text in finished.items():
    assert open(os.path.join(workdir, name, results.METRICS_FILE)).read() == text
  resumed = results.read_metrics(target)
  assert [r["step"] for r in resumed if "train_loss" in r] == [1, 2]  # step 1 was not redone
  expected = results.summarize_workdir(source)["eval_loss"]
  assert results.summarize_workdir(target)["eval_loss"] == pytest.approx(expected, rel=1e-5)
  assert sorted(_attempts(workdir))[:2] == [("broken", 1, "FAIL"), ("broken", 2, "FAIL")]
  assert [a for a in _attempts(workdir) if a[0] == "resumed"] == [
      ("resumed", 1, "FAIL"), ("resumed", 2, "COMPLETE")]
  assert results.trial_status(target)["status"] == "complete"


# --- exclusive claims: two worker processes, one SQLite study, no jax ----------------------

def fake_trial(definition, name, workdir):
  """Stands in for training: logs who ran it, then writes a loss."""
  del definition
  with open(os.path.join(os.path.dirname(workdir), "ran.log"), "a") as f:
    f.write(f"{name} {os.getpid()}\n")
  time.sleep(0.02)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, results.METRICS_FILE), "w") as f:
    f.write(json.dumps({"step": 1, "eval_loss": float(len(name))}) + "\n")


def test_two_workers_on_one_sqlite_study_never_run_the_same_trial(tmp_path):
  workdir = str(tmp_path)
  names = [f"t{i}" for i in range(8)]
  with open(os.path.join(workdir, worker.DEFINITION_FILE), "w") as f:
    json.dump({"entry_point": "", "trials": {n: {} for n in names}}, f)
  handle = study.open_study(study.open_storage(study.default_storage(workdir)),
                            "exclusive", {})
  study.enqueue_due(handle, names, workdir)
  study.enqueue_due(handle, names[:4], workdir)  # nothing due: all are waiting already
  for n in names[4:7]:  # two launchers raced: the same attempt queued twice
    handle.study.enqueue_trial({}, user_attrs={"trial": n, "attempt": 1})
  context = multiprocessing.get_context("spawn")
  procs = [context.Process(target=worker.work, args=(workdir, study.default_storage(workdir),
                                                     "exclusive", fake_trial))
           for _ in range(2)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(120)
  assert [p.exitcode for p in procs] == [0, 0]
  ran = [line.split()[0] for line in open(os.path.join(workdir, "ran.log"))]
  assert sorted(ran) == sorted(names)  # each exactly once
  states = {n: study.state_of(t) for n, t in study.attempts(handle).items()}
  assert states == {n: "complete" for n in names}
  duplicates = [t for t in handle.study.trials if t.user_attrs.get("duplicate")]
  assert len(duplicates) == 3 and all(t.state.name == "FAIL" for t in duplicates)


# --- the report and the IsoFLOP fit, from fixtures -----------------------------------------

def _fixture_trial(sweep_dir, name, d_model, budget, loss, status="complete"):
  cd = config_lib.default_configdict()
  cd.model.update(dict(d_model=d_model, num_heads=2, d_ff=4 * d_model, vocab_size=256,
                       max_len=32))
  cd.data.update(dict(seq_len=32, batch_size=4))
  cfg = config_lib.from_configdict(cd)
  params = scaling.param_count(cfg.model)
  steps = isoflop.steps_for_budget(budget, params, 4 * 32)
  workdir = os.path.join(sweep_dir, name)
  os.makedirs(workdir)
  with open(os.path.join(workdir, results.CONFIG_FILE), "w") as f:
    f.write(config_lib.to_json(cfg))
  with open(os.path.join(workdir, results.METRICS_FILE), "w") as f:
    for step, value in ((steps // 2, loss + 1.0), (steps, loss)):
      f.write(json.dumps({"step": step, "train_loss": value + 0.1, "tokens_per_s": 1e4}) + "\n")
      f.write(json.dumps({"step": step, "eval_loss": value}) + "\n")
  results.record(workdir, name, "running", 0.0)
  results.record(workdir, name, status, 12.5, None if status == "complete" else "boom")
  return {"overrides": {"model.d_model": d_model, "model.d_ff": 4 * d_model, "train.steps": steps},
          "tags": {"budget": budget}}, params, steps


def test_report_tables_and_plots_from_metrics_files(tmp_path):
  sweep_dir, trials, expected = str(tmp_path), {}, {}
  for budget in (1e9, 1e10):
    for d_model in (16, 32, 64):
      name = f"C{budget:.0e}_d{d_model}"
      loss = 3.0 + (math.log(d_model / 32) - 0.3 * math.log10(budget / 1e9)) ** 2
      trials[name], params, steps = _fixture_trial(sweep_dir, name, d_model, budget, loss)
      expected[name] = (loss, params, steps)
  trials["failed"], _, _ = _fixture_trial(sweep_dir, "failed", 16, 1e9, 9.0, status="failed")
  with open(os.path.join(sweep_dir, worker.DEFINITION_FILE), "w") as f:
    json.dump({"config": "fixture.py", "entry_point": "", "trials": trials}, f)

  written = report.write(sweep_dir)
  import csv
  rows = {r["trial"]: r for r in csv.DictReader(open(os.path.join(sweep_dir, report.CSV_FILE)))}
  assert list(rows) == list(trials)
  for name, (loss, params, steps) in expected.items():
    row = rows[name]
    assert row["status"] == "complete" and float(row["eval_loss"]) == pytest.approx(loss)
    assert float(row["train_loss"]) == pytest.approx(loss + 0.1)
    assert int(row["params"]) == params and int(row["tokens"]) == steps * 4 * 32
    assert float(row["flops"]) == pytest.approx(
        scaling.train_flops_per_token(config_lib.model_from_dict(
            dict(d_model=int(row["model.d_model"]), num_heads=2, d_ff=4 * int(row["model.d_model"]),
                 vocab_size=256, max_len=32)), 32) * steps * 4 * 32)
    assert float(row["wall_s"]) == 12.5 and row["tag.budget"] in ("1000000000.0", "10000000000.0")
  assert rows["failed"]["status"] == "failed" and rows["failed"]["error"] == "boom"
  md = open(os.path.join(sweep_dir, report.MD_FILE)).read()
  assert "6 complete, 1 failed of 7 trials (" in md and "| C1e+09_d16 | complete | 1e+09 | 16 | " \
      f"{expected['C1e+09_d16'][2]} |" in md  # d_ff = 4 d_model is left out: it adds nothing
  assert "## IsoFLOP fit" in md and "Chinchilla: about 20" in md
  pngs = sorted(os.path.basename(p) for p in written["files"] if p.endswith(".png"))
  assert pngs == ["by_model_d_model.png", "by_tag_budget.png", "by_train_steps.png",
                  "eval_curves.png", "isoflop.png", "isoflop_laws.png"]
  for png in pngs:
    with open(os.path.join(sweep_dir, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert len(written["isoflop"]["budgets"]) == 2  # the failed trial is left out of the fit


def test_isoflop_fit_recovers_a_known_optimum():
  # Exact parabolas in ln N around N* = 0.05 C^0.5: recovered to rounding.
  points = []
  for budget in (1e10, 1e11, 1e12):
    optimum = 0.05 * budget ** 0.5
    for n in optimum * np.exp(np.linspace(-1.2, 0.9, 6)):
      points.append({"budget": budget, "params": n, "loss": 2.0 + 0.3 * math.log(n / optimum) ** 2
                     - 0.1 * math.log10(budget)})
  analysis = isoflop.analyze(points)
  for row in analysis["budgets"]:
    assert row["params_opt"] == pytest.approx(0.05 * row["budget"] ** 0.5, rel=1e-6)
    assert row["bracketed"] and row["tokens_per_param"] == pytest.approx(
        row["budget"] / 6 / row["params_opt"] ** 2, rel=1e-9)
  assert analysis["params_law"]["exponent"] == pytest.approx(0.5, abs=1e-6)
  assert analysis["params_law"]["coefficient"] == pytest.approx(0.05, rel=1e-5)
  assert analysis["tokens_law"]["exponent"] == pytest.approx(0.5, abs=1e-6)
  # Chinchilla's parametric loss E + A/N^a + B/D^b on D = C/6N has its optimum in closed
  # form (llm.scaling.chinchilla_optimal's "fit"); the parabola only approximates that
  # curve, so it lands near it.
  points = []
  for budget in (1e18, 1e19, 1e20):
    optimum = scaling.chinchilla_optimal(budget)["fit"]["params"]
    for n in optimum * np.exp(np.linspace(-1.5, 1.5, 7)):
      points.append({"budget": budget, "params": n,
                     "loss": scaling.hoffmann_loss(n, budget / (6 * n))})
  analysis = isoflop.analyze(points)
  for row in analysis["budgets"]:
    assert row["params_opt"] == pytest.approx(
        scaling.chinchilla_optimal(row["budget"])["fit"]["params"], rel=0.1)
  h = scaling.HOFFMANN
  assert analysis["params_law"]["exponent"] == pytest.approx(
      h["beta"] / (h["alpha"] + h["beta"]), abs=0.01)
  with pytest.raises(ValueError, match=">= 3 finished sizes"):
    isoflop.fit_budget([1e5, 2e5], [3.0, 3.1])


def test_isoflop_config_budgets_hold_six_sizes_at_the_right_compute():
  base, trials, _, _ = spec.load_sweep_file(os.path.join(ROOT, "configs/sweeps/isoflop.py"))
  by_budget = {}
  for t in trials:
    fields = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("model.")}
    params = scaling.param_count(config_lib.model_from_dict({**base.model.to_dict(), **fields}))
    tokens = t["train.steps"] * base.data.batch_size * base.data.seq_len
    assert 6 * params * tokens == pytest.approx(t["tag.budget"], rel=0.01)
    by_budget.setdefault(t["tag.budget"], []).append(params)
  assert len(by_budget) == 3 and all(len(set(p)) >= 5 for p in by_budget.values())
  for budget, params in by_budget.items():  # the sizes bracket Chinchilla's prediction
    assert min(params) < math.sqrt(budget / 120) < max(params)


def test_metrics_writer_tensorboard_events(tmp_path):
  from tensorboardX.proto import event_pb2

  from llm.train.metrics import TENSORBOARD_DIR, MetricsWriter
  writer = MetricsWriter(str(tmp_path), tensorboard=True)
  writer.write({"step": 3, "train_loss": 2.5, "lr": 1e-3})
  writer.write({"step": 6, "eval_loss": 2.25})
  writer.close()
  [events_file] = os.listdir(tmp_path / TENSORBOARD_DIR)
  data, scalars = open(tmp_path / TENSORBOARD_DIR / events_file, "rb").read(), []
  while data:  # TFRecord framing: length, its CRC, payload, its CRC
    (length,) = struct.unpack("<Q", data[:8])
    event = event_pb2.Event.FromString(data[12:12 + length])
    scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    data = data[12 + length + 4:]
  assert scalars == [(3, "train_loss", 2.5), (3, "lr", pytest.approx(1e-3)),
                     (6, "eval_loss", 2.25)]
  assert len(results.read_metrics(str(tmp_path))) == 2  # the JSONL log is unchanged
