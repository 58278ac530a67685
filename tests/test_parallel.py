"""Sharded training equals single-device training; accumulation equals the full batch;
both equal a direct computation of the weighted-mean loss's gradient."""

import jax
import numpy as np
import optax
import pytest

from llm import config as config_lib
from llm import models, parallel
from llm.train import loop
from llm.train.optimizer import make_optimizer
from tests.helpers import LLAMA_TINY, random_batch

CONFIG = {"model": LLAMA_TINY, "data": dict(seq_len=16, batch_size=8),
          "train": dict(steps=10, warmup_steps=1)}


def _weighted_batch():
  """Token weights far from uniform (a quarter zero, rows weighted 1..8 apart): the loss
  is one mean over all weighted tokens, so a mean of per-device or per-micro-batch means,
  or a gradient summed over them instead of averaged, changes the loss or its gradient."""
  batch = random_batch()
  rng = np.random.default_rng(1)
  weights = rng.choice([0.0, 0.5, 1.0, 2.0], batch["weights"].shape)
  batch["weights"] = (weights * np.arange(1, 9)[:, None] ** 2).astype(np.float32)
  return batch


BATCH = _weighted_batch()


def _one_step(mesh_shape, microbatches=1):
  """(metrics, params after the step, state, params before it) of one train step."""
  data, fsdp, tensor = mesh_shape
  cfg = config_lib.from_configdict({**CONFIG, "train": {**CONFIG["train"],
                                                        "microbatches": microbatches},
                                    "parallel": dict(data=data, fsdp=fsdp, tensor=tensor)})
  mesh = parallel.make_mesh(cfg.parallel, jax.devices()[:data * fsdp * tensor])
  state, shardings = loop.create_state(cfg, mesh)
  before = jax.device_get(state.params)
  train_fn, _ = loop.compiled_steps(shardings, mesh)
  state, metrics = train_fn(state, parallel.shard_batch(BATCH, mesh))
  metrics = {k: float(metrics[k]) for k in ("train_loss", "grad_norm", "tokens")}
  return metrics, jax.device_get(state.params), state, before


@pytest.fixture(scope="module")
def single_device():
  return _one_step((1, 1, 1))


@pytest.fixture(scope="module")
def reference(single_device):
  """The full batch's weighted mean token loss, its gradient's norm and the params after
  one optimizer step on that gradient: computed directly, without a train step or mesh."""
  cfg = config_lib.from_configdict(CONFIG)
  module, before = models.build(cfg.model), single_device[3]

  def loss(params):
    logits = module.apply({"params": params}, BATCH["inputs"], BATCH["positions"],
                          BATCH["segment_ids"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, BATCH["targets"])
    return (nll * BATCH["weights"]).sum() / BATCH["weights"].sum()

  def step(params):
    value, grads = jax.value_and_grad(loss)(params)
    tx = make_optimizer(cfg.train)
    updates, _ = tx.update(grads, tx.init(params), params)
    return value, optax.tree.norm(grads), optax.apply_updates(params, updates)
  value, grad_norm, after = jax.device_get(jax.jit(step)(before))
  return {"train_loss": float(value), "grad_norm": float(grad_norm),
          "tokens": float(BATCH["weights"].sum())}, after


def _assert_same_step(metrics, params, want_metrics, want_params):
  for key in ("train_loss", "grad_norm", "tokens"):  # grad_norm: the gradient's scale
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=2e-5, err_msg=key)
  # Adam's first update is ~lr * sign(g): the params check the gradient's direction
  # (f32 reduction-order noise in tiny gradients shows at ~1e-6; the update is ~3e-3).
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params,
                         want_params)


def test_single_device_step_is_the_weighted_mean_losss_gradient_step(single_device, reference):
  metrics, params, _, before = single_device
  _assert_same_step(metrics, params, *reference)
  moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), params, before)
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-3  # the step did update the params


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(single_device, reference, mesh_shape):
  metrics, params, state, _ = _one_step(mesh_shape)
  _assert_same_step(metrics, params, reference[0], single_device[1])
  if mesh_shape[1] > 1:  # FSDP: the big kernels really are split over devices
    kernel = state.params["layers"]["mlp"]["wi_gate"]["kernel"]
    assert "fsdp" in str(kernel.sharding.spec)
    assert kernel.addressable_shards[0].data.size < kernel.size


def test_gradient_accumulation_equals_full_batch(single_device, reference):
  metrics, params, _, _ = _one_step((1, 1, 1), microbatches=4)
  _assert_same_step(metrics, params, reference[0], single_device[1])


def test_mesh_that_does_not_fit_the_devices_names_the_fix():
  with pytest.raises(config_lib.ConfigError, match="config.parallel"):
    parallel.make_mesh(config_lib.ParallelConfig(data=3, fsdp=1, tensor=1), jax.devices())


def test_logical_spec_drops_axes_that_do_not_divide():
  mesh = parallel.make_mesh(config_lib.ParallelConfig(data=2, fsdp=2, tensor=2), jax.devices())
  assert parallel.logical_to_spec(("embed", "mlp"), (8, 6), mesh) == jax.sharding.PartitionSpec(
      "fsdp", "tensor")
  assert parallel.logical_to_spec(("embed", "heads"), (7, 3), mesh) == \
      jax.sharding.PartitionSpec(None, None)
