"""Kill tests with real processes, fallback restore, NaN injection, locks, bad resumes.

The main job runs as a subprocess and is SIGKILLed while an async save is being
written, then SIGTERMed; each time it is restarted, and the final params must be
bitwise equal to an uninterrupted run's. Exact moments come from `LLM_FAULT`
(llm.train.safety.fault_point). Subprocesses share the test process's devices and its
persistent compilation cache (conftest), so they reuse what the reference run compiled.
"""

import errno
import importlib.util
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from llm import config as config_lib
from llm import parallel, peft, train
from llm.config import ConfigError
from llm.train import checkpoint as ckpt
from llm.train import safety
from llm.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
OVERRIDES = {"model.d_model": 32, "model.num_layers": 2, "model.d_ff": 64,
             "model.num_heads": 2, "model.num_kv_heads": 2,
             "model.vocab_size": 512, "data.seq_len": 16,
             "data.batch_size": 8, "data.max_documents": 200, "data.num_sentinels": 8,
             "train.steps": STEPS, "train.log_every": 1, "train.eval_every": 6,
             "train.eval_batches": 1, "train.checkpoint_every": 3, "train.keep_checkpoints": 10,
             "train.peak_flops": 1e9, "train.num_samples": 0}


def make_config(**changes):
  spec = importlib.util.spec_from_file_location("gpt_config", os.path.join(ROOT, "configs/gpt.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cd = module.get_config("tiny")
  for key, value in {**OVERRIDES, **changes}.items():
    section, name = key.split(".")
    cd[section][name] = value
  return config_lib.from_configdict(cd)


def launch(workdir, fault=""):
  args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  env = {**os.environ, safety.FAULT_ENV: fault}  # with conftest's compilation cache
  return subprocess.run([sys.executable, "-m", "experiments.pretrain_clm", "--config",
                         "configs/gpt.py:tiny", "--workdir", str(workdir), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def params_of(workdir):
  return jax.device_get(train.load(str(workdir))[1])


def assert_bitwise_equal(a, b):
  flat_a, tree_a = jax.tree_util.tree_flatten(a)
  flat_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  assert all(np.array_equal(x, y) for x, y in zip(flat_a, flat_b))


def committed_steps(workdir):
  return sorted(int(n) for n in os.listdir(ckpt.checkpoint_dir(workdir)) if n.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run, in this process."""
  workdir = tmp_path_factory.mktemp("reliability") / "reference"
  train.run(make_config(), str(workdir), progress=False)
  return workdir, params_of(workdir)


@pytest.fixture(scope="module")
def interrupted(reference):
  """The same run killed while saving, preempted, then finished; returns what each left.

  Two real launches (each pays a process start); the last leg resumes in this process,
  through the same `train.run` the entry point calls."""
  workdir = reference[0].parent / "interrupted"
  seen = {}
  killed = launch(workdir, "kill:save@6")  # dies while checkpoint 6 is being written
  seen["after_save_kill"] = (killed.returncode, killed.stderr, committed_steps(workdir))
  termed = launch(workdir, "term:step@8")
  seen["after_term"] = (termed.returncode, termed.stderr, committed_steps(workdir),
                        os.listdir(ckpt.checkpoint_dir(workdir)), read_metrics(str(workdir)))
  train.run(make_config(), str(workdir), progress=False)
  return workdir, seen


def test_killed_and_preempted_runs_end_bitwise_equal_to_an_uninterrupted_one(reference,
                                                                            interrupted):
  workdir, seen = interrupted
  rc, stderr, steps = seen["after_save_kill"]
  assert rc == -signal.SIGKILL, stderr[-2000:]
  assert steps == [3]  # 3 committed before 6's save began; 6 never did
  rc, stderr, steps, entries, metrics = seen["after_term"]
  assert rc == safety.PREEMPTED_EXIT_CODE, stderr[-2000:]
  assert "SIGTERM received: saved step 8" in stderr.strip().splitlines()[-1]
  assert steps[-1] == 8 == max(r["step"] for r in metrics)  # saved the step it reached
  assert not [e for e in entries if not e.isdigit()], entries  # the killed save's tmp dir is gone
  assert committed_steps(workdir)[-1] == STEPS
  assert_bitwise_equal(params_of(workdir), reference[1])


def corrupt(workdir, step):
  state_dir = os.path.join(ckpt.checkpoint_dir(workdir), str(step), "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\0garbage")


def test_a_corrupt_newest_checkpoint_falls_back_and_training_recovers(reference, tmp_path,
                                                                       caplog):
  workdir = tmp_path / "corrupt"
  shutil.copytree(reference[0], workdir)
  corrupt(workdir, STEPS)
  cfg = make_config()
  mesh = parallel.make_mesh(parallel.ParallelConfig(data=1), jax.devices()[:1])
  state, shardings = train.create_state(cfg, mesh)
  mgr = ckpt.manager(str(workdir), 10, async_save=False, create=False)
  abstract = ckpt.abstract_with_shardings(state.checkpoint_items(), shardings.checkpoint_items())
  previous, _ = ckpt.restore(mgr, abstract, STEPS - 3)
  mgr.close()
  loaded = params_of(workdir)  # load() (generate, evaluate) skips the corrupt step
  assert_bitwise_equal(loaded, jax.device_get(peft.merge(previous["params"],
                                                         previous["frozen"])))
  assert f"checkpoint {STEPS} does not restore" in caplog.text
  train.run(cfg, str(workdir), progress=False)  # resumes from 9, retrains 10..12
  assert os.listdir(workdir / ckpt.CORRUPT_DIR)  # kept aside, not deleted
  assert_bitwise_equal(params_of(workdir), reference[1])
  corrupt(workdir, STEPS)
  for step in committed_steps(workdir)[:-1]:
    shutil.rmtree(os.path.join(ckpt.checkpoint_dir(workdir), str(step)))
  with pytest.raises(ConfigError, match="no checkpoint in .* restores"):
    train.load(str(workdir))


def test_nonfinite_steps_stop_before_any_save_or_are_skipped(reference, tmp_path):
  workdir = tmp_path / "nan"
  shutil.copytree(reference[0], workdir)
  diverging = dict(steps=STEPS + 3, learning_rate=1e30, allow_config_change=True)
  cfg = make_config(**{f"train.{k}": v for k, v in diverging.items()})
  with pytest.raises(safety.NonFiniteError, match=r"at step 1[34]; stopped before saving"):
    train.run(cfg, str(workdir), progress=False)
  assert committed_steps(workdir)[-1] == STEPS
  assert_bitwise_equal(params_of(workdir), reference[1])  # the last good state survives
  skipping = make_config(**{f"train.{k}": v for k, v in diverging.items()},
                         **{"train.skip_nonfinite": True})
  train.run(skipping, str(workdir), progress=False)
  last = read_metrics(str(workdir))[-2]  # the last train row (an eval row follows)
  assert last["step"] == STEPS + 3 and last["nonfinite_steps"] >= 2
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params_of(workdir)))


def test_a_locked_workdir_fails_at_once_naming_the_owner(tmp_path):
  lock = safety.WorkdirLock(str(tmp_path)).acquire()
  try:
    with pytest.raises(ConfigError, match=rf"in use by pid {os.getpid()} on host"):
      train.run(make_config(), str(tmp_path), progress=False)
  finally:
    lock.release()
  assert not os.listdir(tmp_path)  # released: the lock file is gone


def test_a_failed_start_leaves_the_workdir_as_it_found_it(tmp_path):
  fresh = tmp_path / "fresh"
  with pytest.raises(ValueError, match="batch_size"):  # found late: after data and mesh
    train.run(make_config(**{"data.batch_size": 3}), str(fresh), progress=False)
  assert not fresh.exists()
  with pytest.raises(ConfigError, match="remote workdirs are not supported yet"):
    train.run(make_config(), "gs://bucket/run", progress=False)
  assert not os.path.exists("gs:")


def test_a_changed_run_field_on_resume_is_refused(reference):
  workdir = str(reference[0])
  for field, value in (("data.batch_size", 16), ("train.steps", 20), ("data.seq_len", 8),
                       ("data.shuffle_seed", 1), ("data.source", "text:/x.txt"),
                       ("data.encoding", "latin-1"), ("data.streaming", True)):
    with pytest.raises(ConfigError, match=rf"changed {field}: .*allow_config_change=True"):
      ckpt.check_config(workdir, make_config(**{field: value}), resuming=True)
  ckpt.check_config(workdir, make_config(**{"train.steps": 20,
                                            "train.allow_config_change": True}), resuming=True)
  with pytest.raises(ConfigError, match="different model .*model.d_model"):
    ckpt.check_config(workdir, make_config(**{"model.d_model": 64}), resuming=False)


def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(reference, tmp_path,
                                                                  monkeypatch):
  workdir = tmp_path / "full"
  shutil.copytree(reference[0], workdir)

  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(ckpt.ocp.CheckpointManager, "save", no_space)
  with pytest.raises(OSError, match=r"saving checkpoint 15 .*no space left on the device; the "
                                    "previous checkpoint is intact"):
    train.run(make_config(**{"train.steps": 15, "train.allow_config_change": True}),
              str(workdir), progress=False)
  monkeypatch.undo()
  assert committed_steps(workdir)[-1] == STEPS
  assert_bitwise_equal(params_of(workdir), reference[1])


def test_a_truncated_last_metrics_line_is_tolerated(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_lo')
  assert read_metrics(str(tmp_path)) == [{"step": 1, "train_loss": 2.0}]
  path.write_text('{"step": 1, "tr\n{"step": 2}\n')
  with pytest.raises(ValueError, match="line 1 is not JSON"):
    read_metrics(str(tmp_path))
