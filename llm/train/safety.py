"""What keeps a run's last good state safe: preemption, a workdir lock, a non-finite guard.

- `Preemption`: SIGTERM (the scheduler's and the preemption notice's signal) and SIGINT
  ask the loop to finish its step, save, wait for the save and exit with
  `PREEMPTED_EXIT_CODE`. On multi-host every process must save the same step, so there
  the decision comes from JAX's preemption sync point (through orbax), not a local signal.
- `WorkdirLock`: one run owns a workdir; a second fails at once naming the owner.
  `flock` is released by the kernel when the owner dies, so a SIGKILLed run never
  leaves a stale lock.
- `disk_errors`: a full disk while saving or logging is one line, and the previous
  checkpoint stays restorable.
- `check_finite`: the optimizer skips any update whose gradients are not finite
  (`optax.apply_if_finite`), so params never turn NaN; before anything is saved the loop
  asks whether a step was skipped and, unless `train.skip_nonfinite`, stops.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import time

import jax
import optax

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", as a scheduler should read it


FAULT_ENV = "LLM_FAULT"  # tests only: "kill:POINT@STEP" or "term:POINT@STEP"


def fault_point(point: str, step: int) -> None:
  """Sends this process SIGKILL or SIGTERM at a named point when LLM_FAULT asks, so kill
  tests hit exact moments: after a step ("step"), or right after an async save was
  dispatched, i.e. while it is being written ("save")."""
  signame, _, where = os.environ.get(FAULT_ENV, "").partition(":")
  if where == f"{point}@{step}":
    os.kill(os.getpid(), {"kill": signal.SIGKILL, "term": signal.SIGTERM}[signame])


class Preempted(Exception):
  """The run stopped at a signal after saving `step`; rerunning resumes there."""

  def __init__(self, step: int, signame: str):
    super().__init__(f"{signame} received: saved step {step} and stopped; rerun the same "
                     "command to resume")
    self.step, self.signame = step, signame


class NonFiniteError(RuntimeError):
  """The loss or gradient became non-finite; nothing after the last good save was kept."""


class Preemption:
  """Context manager: installs the signal handlers (single process) and restores them."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signame = None
    self._previous = {}

  def __enter__(self):
    if jax.process_count() == 1 and _in_main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False

  def _handle(self, signum, frame):
    if self.signame is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
      raise KeyboardInterrupt
    self.signame = signal.Signals(signum).name

  def requested(self, step: int, mgr) -> bool:
    if jax.process_count() > 1:
      if mgr.reached_preemption(step):
        self.signame = self.signame or "preemption notice"
        return True
      return False
    return self.signame is not None


def _in_main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


class WorkdirLock:
  """An exclusive lock on `workdir/.lock` holding the owner's pid, host and start time."""

  NAME = ".lock"

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, self.NAME)
    self._file = None

  def acquire(self) -> "WorkdirLock":
    from llm.config import ConfigError
    if jax.process_index() != 0 or self._file is not None:  # process 0 owns a shared workdir
      return self
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      owner = f.read().strip() or "another process"
      f.close()
      raise ConfigError(f"--workdir {os.path.dirname(self.path)} is in use by {owner}; wait "
                        "for that run to finish (or stop it) or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on host {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is not None:
      os.remove(self.path)
      self._file.close()  # closing drops the flock
      self._file = None


def guard_nonfinite(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Skips (zero update, optimizer state kept) any step whose gradients are not finite."""
  return optax.apply_if_finite(tx, max_consecutive_errors=2**30)


def nonfinite_steps(opt_state) -> int:
  """How many updates `guard_nonfinite` skipped so far (a host sync)."""
  return int(jax.device_get(opt_state.total_notfinite))


def check_finite(opt_state, step: int, seen: int, skip: bool) -> int:
  """Raises NonFiniteError if an update was skipped since the last check (`seen` skips),
  unless `skip`; returns the new count. Called before every save and log."""
  total = nonfinite_steps(opt_state)
  if total > seen and not skip:
    streak = int(jax.device_get(opt_state.notfinite_count))
    at = f"at step {step - streak + 1}" if streak else f"by step {step}"
    raise NonFiniteError(
        f"non-finite loss or gradient norm {at}; stopped before saving, so the last "
        "checkpoint is the last good state. Lower --config.train.learning_rate or "
        "--config.train.grad_clip, or set --config.train.skip_nonfinite=True to skip such "
        "steps")
  return total


class disk_errors:
  """Turns a full disk or quota (ENOSPC, EDQUOT) into one line; the previous checkpoint
  is untouched, because orbax only renames a step into place once it is complete."""

  def __init__(self, what: str):
    self.what = what

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    cause = error
    while cause is not None and not isinstance(cause, OSError):
      cause = cause.__cause__ or cause.__context__
    if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
      raise OSError(cause.errno, f"{self.what}: no space left on the device; the previous "
                    "checkpoint is intact. Free space (or set --config.train.keep_checkpoints "
                    "lower) and rerun to resume") from None
    return False
