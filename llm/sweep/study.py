"""The sweep's record and work queue: an Optuna study in an RDB storage.

Each sweep trial is one or more Optuna trials ("attempts") carrying the user attrs
`trial` (the sweep trial's name) and `attempt`. A launcher enqueues an attempt (a
WAITING Optuna trial) for every sweep trial that is not complete, queued or running;
workers claim one by the storage's WAITING -> RUNNING compare-and-set. That check is
a row lock on PostgreSQL / MySQL; SQLite through Python's driver reads outside the
write transaction, so local claims are also serialised by a file lock in the sweep
directory. Two launchers racing can still enqueue the same attempt twice; a claimed
attempt therefore steps aside (marked `duplicate`) when the sweep trial is already
complete or a lower-numbered copy of the same attempt exists, so no trial runs twice.

Attempts end COMPLETE (value = final eval loss), FAIL with `error` (retried only when
asked), or FAIL without it: interrupted (Ctrl-C, SIGTERM) or stale (its worker stopped
sending heartbeats), which the next launch resumes from the trial's checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import threading
import warnings

import optuna
from optuna.trial import TrialState

HEARTBEAT_S = 30
GRACE_S = 180  # a RUNNING attempt without a heartbeat for this long is stale
CONNECT_TIMEOUT_S = 15
LOCK_FILE = ".sweep.lock"
DB_FILE = "sweep.db"


def default_storage(sweep_dir: str) -> str:
  return f"sqlite:///{os.path.abspath(os.path.join(sweep_dir, DB_FILE))}"


def open_storage(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> optuna.storages.RDBStorage:
  """The storage at `url`, or a ValueError naming it within `timeout_s` seconds."""
  kwargs: dict = {"pool_pre_ping": True}
  if url.startswith("sqlite"):
    kwargs["connect_args"] = {"timeout": 60}  # wait for other workers' writes
  elif url.startswith(("postgresql", "mysql")):
    kwargs["connect_args"] = {"connect_timeout": int(timeout_s)}
  result: dict = {}

  def connect():
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        result["storage"] = optuna.storages.RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    except Exception as e:  # driver missing, bad URL, server down, unwritable file
      result["error"] = e

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    raise ValueError(f"--storage {url}: no answer within {timeout_s:g} s; check that the "
                     "database server is up and reachable")
  if "error" in result:
    e = result["error"]
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, ModuleNotFoundError):
      reason += " (install the database driver for this URL)"
    raise ValueError(f"--storage {url}: cannot be reached ({reason}); fix the URL or omit "
                     "--storage for a SQLite file in --workdir") from None
  return result["storage"]


@dataclasses.dataclass(frozen=True)
class Handle:
  """The study and the storage it lives in (claims go through the storage's API)."""
  study: optuna.Study
  storage: optuna.storages.RDBStorage
  study_id: int

  def trial_id(self, number: int) -> int:
    return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

  def set_attr(self, number: int, key: str, value) -> None:
    self.storage.set_trial_user_attr(self.trial_id(number), key, value)


def open_study(storage, name: str, trial_hashes: dict[str, str]) -> Handle:
  """The sweep's study (created if new). Each trial's definition hash is recorded in it,
  so a study that ran a different trial under the same name is refused; a sweep may
  gain trials."""
  study = optuna.create_study(storage=storage, study_name=name, direction="minimize",
                              load_if_exists=True)
  recorded = study.user_attrs
  for trial, digest in trial_hashes.items():
    key = f"definition:{trial}"
    if key not in recorded:
      study.set_user_attr(key, digest)
    elif recorded[key] != digest:
      raise ValueError(f"study {name!r} in the storage holds another sweep (its trial "
                       f"{trial!r} is defined differently); use a new --workdir")
  return Handle(study, storage, storage.get_study_id_from_name(name))


@contextlib.contextmanager
def local_lock(sweep_dir: str):
  """Serialises enqueue and claim among this machine's processes (see module doc)."""
  os.makedirs(sweep_dir, exist_ok=True)
  with open(os.path.join(sweep_dir, LOCK_FILE), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def attempts(h: Handle) -> dict[str, list]:
  """{sweep trial name: its attempts (FrozenTrials, duplicates left out), by number}."""
  by_name: dict[str, list] = {}
  for t in h.study.get_trials(deepcopy=False):
    if "trial" in t.user_attrs and not t.user_attrs.get("duplicate"):
      by_name.setdefault(t.user_attrs["trial"], []).append(t)
  return by_name


def state_of(tries: list) -> str:
  """complete | running | waiting | failed (with an error) | interrupted | new."""
  if not tries:
    return "new"
  if any(t.state == TrialState.COMPLETE for t in tries):
    return "complete"
  for state, label in ((TrialState.RUNNING, "running"), (TrialState.WAITING, "waiting")):
    if any(t.state == state for t in tries):
      return label
  last = max(tries, key=lambda t: (t.user_attrs.get("attempt", 0), t.number))
  return "failed" if "error" in last.user_attrs else "interrupted"


def enqueue_due(h: Handle, names, sweep_dir: str, retry_failed: bool = False) -> dict:
  """Queues an attempt for each trial that is new, interrupted or stale (and failed, if
  `retry_failed`); returns {name: state before}."""
  with local_lock(sweep_dir):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      optuna.storages.fail_stale_trials(h.study)  # stale RUNNING -> FAIL without an error
    by_name = attempts(h)
    states = {}
    for name in names:
      tries = by_name.get(name, [])
      states[name] = state_of(tries)
      if states[name] in ("new", "interrupted") or (retry_failed and states[name] == "failed"):
        attempt = 1 + max((t.user_attrs.get("attempt", 0) for t in tries), default=0)
        h.study.enqueue_trial({}, user_attrs={"trial": name, "attempt": attempt})
  return states


def claim(h: Handle, sweep_dir: str):
  """(Optuna trial number, sweep trial name) of a WAITING attempt now RUNNING for this
  process, or None when the queue is empty."""
  while True:
    with local_lock(sweep_dir):
      waiting = sorted(h.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)),
                       key=lambda t: t.number)
      won = next((t for t in waiting
                  if h.storage.set_trial_state_values(h.trial_id(t.number), TrialState.RUNNING)),
                 None)
    if won is None:
      return None
    if not _superseded(h, won):
      return won.number, won.user_attrs["trial"]
    h.set_attr(won.number, "duplicate", True)
    h.study.tell(won.number, state=TrialState.FAIL)


def _superseded(h: Handle, mine) -> bool:
  name, attempt = mine.user_attrs["trial"], mine.user_attrs["attempt"]
  for t in attempts(h).get(name, []):
    if t.number == mine.number:
      continue
    if t.state == TrialState.COMPLETE:
      return True
    if t.user_attrs.get("attempt") == attempt and t.number < mine.number:
      return True
  return False


def finish(h: Handle, number: int, value: float | None, attrs: dict) -> None:
  for key, v in attrs.items():
    h.set_attr(number, key, v)
  if value is None:  # nothing was logged: the attempt produced no result
    h.set_attr(number, "error", "no loss was logged")
    h.study.tell(number, state=TrialState.FAIL)
  else:
    h.study.tell(number, value)


def fail(h: Handle, number: int, error: str | None) -> None:
  """Ends an attempt as FAIL; `error` None marks it interrupted (resumed on next launch)."""
  h.set_attr(number, *(("error", error) if error is not None else ("interrupted", True)))
  h.study.tell(number, state=TrialState.FAIL)


@contextlib.contextmanager
def heartbeat(h: Handle, number: int, interval_s: float = HEARTBEAT_S):
  """Records the attempt's heartbeat while the block runs, so a crashed worker's attempt
  turns stale after GRACE_S and is resumed by the next launch."""
  tid = h.trial_id(number)
  stop = threading.Event()

  def beat():
    while not stop.is_set():
      try:
        h.storage.record_heartbeat(tid)
      except Exception:  # a busy database must not kill the trial; the next beat retries
        pass
      stop.wait(interval_s)

  thread = threading.Thread(target=beat, daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
