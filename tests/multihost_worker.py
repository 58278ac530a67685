"""One process of the multi-process test (`tests/test_multihost.py`), or its reference.

  python -m tests.multihost_worker WORKDIR [--then_die]

Joins the job the JAX_* environment variables describe (none: a single process), trains
the tiny GPT on a (2, 2, 2, 1) mesh spanning every process's devices, each process
feeding only its own rows of the global batch; checkpoints after 2 steps through orbax
from every process, restores that checkpoint and trains 2 more steps; then (two processes)
process 1 sends itself SIGTERM and both train until the preemption sync point says stop;
prints the losses and that step as JSON. With --then_die process 1 then kills itself and
process 0 tries one more step, which must end the process with a one-line error instead
of waiting for the dead peer.
"""

import json
import os
import signal
import sys
import time

from experiments.cli import one_line_errors
from llm import parallel


@one_line_errors
def main(argv):
  workdir, then_die = argv[1], "--then_die" in argv
  parallel.init_distributed(heartbeat_timeout_s=10)
  import jax

  from llm import config as config_lib
  from llm.data import streaming
  from llm.train import checkpoint as ckpt
  from llm.train import loop, safety
  import numpy as np

  from tests.helpers import GPT_TINY, random_batch, random_params
  from tests.test_parallel import FAST_COMPILE
  cfg = config_lib.from_configdict({
      "model": GPT_TINY, "data": dict(seq_len=16, batch_size=8),
      "train": dict(steps=10, warmup_steps=1), "parallel": dict(data=2, fsdp=2, tensor=2)})
  mesh = parallel.make_mesh(cfg.parallel)
  parallel.check_fits_mesh(cfg, mesh)
  # The state from host arrays (the same on every process) and the step compiled at
  # XLA:CPU's lowest backend optimisation: no `init` compile, half the step's.
  make = loop.state_factory(cfg)
  shardings = loop.state_shardings(make, mesh)
  tokens = np.ones((1, 8), np.int32)
  state = jax.device_put(make(params=random_params(make.args[0], tokens)), shardings)
  jitted, _ = loop.compiled_steps(shardings, mesh)
  train_fn = None
  per_process = cfg.data.batch_size // jax.process_count()  # the rows BatchIterator hands it
  rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)

  def step(state, seed):
    nonlocal train_fn
    local = {k: v[rows] for k, v in random_batch(seed=seed).items()}
    batch = parallel.shard_batch(local, mesh)
    train_fn = train_fn or jitted.lower(state, batch).compile(FAST_COMPILE)
    state, metrics = train_fn(state, batch)
    return state, float(jax.device_get(metrics["train_loss"]))

  losses = []
  for seed in (1, 2):
    state, loss = step(state, seed)
    losses.append(loss)
  mgr = ckpt.manager(workdir, keep=1, async_save=False)
  # Every process's own data position, gathered as a streaming run saves it.
  positions = streaming.all_gather_json({"process": jax.process_index()})
  ckpt.save(mgr, 2, state.checkpoint_items(), {"position": 2, "per_process": positions})
  ckpt.wait(mgr)
  abstract = ckpt.abstract_with_shardings(state.checkpoint_items(),
                                          shardings.checkpoint_items())
  items, data_state = ckpt.restore(mgr, abstract, 2)
  state = state.replace_items(items)
  for seed in (3, 4):
    state, loss = step(state, seed)
    losses.append(loss)
  preempted_at = None
  if jax.process_count() > 1:  # a preemption notice reaches process 1 only
    with safety.Preemption() as preemption:
      preemption.requested(4, mgr)  # every process's last step is 4
      if jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      # JAX's sync protocol picks (the processes' last step) + 1, so a step that finishes
      # before the protocol does would pass it by: pause, as a real (slow) step would.
      time.sleep(5)
      for s in range(5, 100):
        state, _ = step(state, s)
        if preemption.requested(s, mgr):
          preempted_at = s
          break
        time.sleep(0.1)
  mgr.close()
  print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                    "devices": jax.device_count(), "losses": losses, "data": data_state,
                    "preempted_at": preempted_at}), flush=True)
  if then_die:
    if jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGKILL)
    step(state, 5)


if __name__ == "__main__":
  main(sys.argv)
