"""Two processes x 4 CPU devices on localhost (jax.distributed, gloo collectives) train
exactly as one process with 8 devices, checkpoint and restore from every process, agree on
the step to stop at when one of them gets a preemption notice (SIGTERM), and a surviving
process exits with a one-line error when its peer dies.

The processes (`tests/multihost_worker.py`) and the single-process reference run side by
side, so the test takes about one compile and four steps of wall time.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from llm import parallel
from llm.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, devices, extra_env=None, *args):
  env = {k: v for k, v in os.environ.items() if k not in parallel.DISTRIBUTED_ENV.values()}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
                       " --xla_backend_optimization_level=0",
             JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **(extra_env or {}))
  return subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(workdir), *args],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _result(out: str) -> dict:
  return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_two_processes_train_as_one_and_a_dead_peer_ends_the_job(tmp_path):
  port = _free_port()
  workers = [_launch(tmp_path / "multi", 4, dict(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                                  JAX_NUM_PROCESSES="2",
                                                  JAX_PROCESS_ID=str(i)), "--then_die")
             for i in range(2)]
  reference = _launch(tmp_path / "single", 8)
  ref_out, ref_err = reference.communicate(timeout=300)
  assert reference.returncode == 0, ref_err[-2000:]
  out1, _ = workers[1].communicate(timeout=300)
  died = time.monotonic()
  assert workers[1].returncode == -9  # killed itself after training, as told
  out0, err0 = workers[0].communicate(timeout=120)
  waited = time.monotonic() - died

  expected = _result(ref_out)
  assert (expected["processes"], expected["devices"]) == (1, 8)
  got = [_result(out) for out in (out0, out1)]
  for result in got:
    assert (result["processes"], result["devices"], result["data"]) == (2, 8, {
        "position": 2, "per_process": [{"process": 0}, {"process": 1}]})
    np.testing.assert_allclose(result["losses"], expected["losses"], rtol=1e-5)
  # SIGTERM reached process 1 only; through JAX's preemption sync point both processes
  # stop at the same step (the step the loop would save).
  assert got[0]["preempted_at"] == got[1]["preempted_at"] is not None, got
  # Either the collective fails (our one line) or, while it waits, the coordination
  # service misses the peer's heartbeats and terminates the process with its own message.
  assert workers[0].returncode != 0 and waited < 60, (workers[0].returncode, waited)
  assert ("error: process 0 of 2 lost a peer" in err0
          or "This most likely indicates that another task died" in err0), err0[-2000:]


def test_inconsistent_launches_fail_in_one_line_before_starting():
  env = dict(JAX_COORDINATOR_ADDRESS="localhost:1234", JAX_NUM_PROCESSES="2",
             JAX_PROCESS_ID="0")
  assert parallel.distributed_args(env=env) == {
      "coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 0}
  assert parallel.distributed_args(env={}) is None
  assert parallel.distributed_args(env={"SLURM_NTASKS": "4"}) == {}
  cases = [
      (dict(env, JAX_PROCESS_ID="2"), {}, r"--process_id=2 is not in \[0, num_processes=2\)"),
      (env, dict(num_processes=4), "--num_processes=4 but JAX_NUM_PROCESSES=2"),
      (dict(SLURM_NTASKS="4"), dict(num_processes=2, process_id=0,
                                    coordinator_address="h:1"),
       "--num_processes=2 but SLURM started 4 processes"),
      ({"JAX_COORDINATOR_ADDRESS": "h:1"}, {}, "needs --num_processes"),
      (dict(env, JAX_NUM_PROCESSES="two"), {}, "JAX_NUM_PROCESSES='two': expected an integer"),
  ]
  for environ, flags, match in cases:
    with pytest.raises(ConfigError, match=match) as info:
      parallel.distributed_args(**flags, env=environ)
    assert "\n" not in str(info.value)
