"""The optimizer against hand computation: the warm-up / cosine schedule's values, the
learning rate the optimizer really applies, and weight decay on matrices only.
(bfloat16 training is tested by tests/test_train.py, whose model computes in bfloat16.)"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm import config as config_lib
from llm.train.optimizer import make_optimizer, schedule

PEAK, WARMUP, STEPS, MIN_RATIO, DECAY = 1e-2, 4, 100, 0.1, 0.1


def _train_config(**train):
  return config_lib.from_configdict({"train": dict(
      dict(steps=STEPS, learning_rate=PEAK, warmup_steps=WARMUP, min_lr_ratio=MIN_RATIO,
           weight_decay=DECAY), **train)}).train


def test_schedule_warms_up_from_the_first_step_then_decays_by_cosine():
  lr = schedule(_train_config())
  # Step s (0-based) trains with PEAK * (s + 1) / WARMUP while warming up: the first step
  # already moves (not 0); then cosine over the STEPS - WARMUP = 96 steps left.
  want = {0: 2.5e-3, 1: 5e-3, 2: 7.5e-3, 3: 1e-2, 51: PEAK * (MIN_RATIO + (1 - MIN_RATIO) / 2),
          99: PEAK * MIN_RATIO, 150: PEAK * MIN_RATIO}
  np.testing.assert_allclose([float(lr(s)) for s in want], list(want.values()), rtol=1e-6)
  np.testing.assert_allclose(float(schedule(_train_config(warmup_steps=0))(0)), PEAK)


def _params():
  return {"dense": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.ones(2)},
          "norm": {"scale": jnp.ones(2)}, "embed": {"embedding": jnp.full((4, 2), 2.0)}}


def test_the_applied_learning_rate_follows_the_schedule_and_only_matrices_decay():
  tx, params = make_optimizer(_train_config()), _params()
  state = tx.init(params)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  for step, lr in enumerate([2.5e-3, 5e-3]):  # the schedule's first two values
    before = params
    updates, state = tx.update(zeros, state, params)
    params = optax.apply_updates(params, updates)
    # A zero gradient leaves only decoupled decay: matrices shrink by lr * weight_decay...
    for path in (("dense", "kernel"), ("embed", "embedding")):
      np.testing.assert_allclose(params[path[0]][path[1]],
                                 before[path[0]][path[1]] * (1 - lr * DECAY), rtol=1e-6)
    # ... and biases and norm scales do not move at all.
    np.testing.assert_array_equal(params["dense"]["bias"], 1.0)
    np.testing.assert_array_equal(params["norm"]["scale"], 1.0)
  # With a gradient they do train: Adam's first step is lr * sign(g) (plus decay on kernels).
  tx, params = make_optimizer(_train_config()), _params()
  ones = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(ones, tx.init(params), params)
  stepped = optax.apply_updates(params, updates)
  np.testing.assert_allclose(stepped["dense"]["bias"], 1 - 2.5e-3, rtol=1e-6)
  np.testing.assert_allclose(stepped["norm"]["scale"], 1 - 2.5e-3, rtol=1e-6)
  np.testing.assert_allclose(stepped["dense"]["kernel"], 2 - 2.5e-3 * (1 + DECAY * 2), rtol=1e-6)
