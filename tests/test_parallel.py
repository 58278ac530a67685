"""Sharded training equals single-device training; accumulation equals the full batch."""

import jax
import numpy as np
import pytest

from llm import config as config_lib
from llm import parallel
from llm.train import loop
from tests.helpers import LLAMA_TINY, random_batch

CONFIG = {"model": LLAMA_TINY, "data": dict(seq_len=16, batch_size=8),
          "train": dict(steps=10, warmup_steps=1)}


def _one_step(mesh_shape, microbatches=1):
  data, fsdp, tensor = mesh_shape
  cfg = config_lib.from_configdict({**CONFIG, "train": {**CONFIG["train"],
                                                        "microbatches": microbatches},
                                    "parallel": dict(data=data, fsdp=fsdp, tensor=tensor)})
  mesh = parallel.make_mesh(cfg.parallel, jax.devices()[:data * fsdp * tensor])
  state, shardings = loop.create_state(cfg, mesh)
  train_fn, _ = loop.compiled_steps(shardings, mesh)
  state, metrics = train_fn(state, parallel.shard_batch(random_batch(), mesh))
  return float(metrics["train_loss"]), jax.device_get(state.params), state


@pytest.fixture(scope="module")
def single_device():
  return _one_step((1, 1, 1))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(single_device, mesh_shape):
  loss, params, state = _one_step(mesh_shape)
  ref_loss, ref_params, _ = single_device
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  # Adam's first update is ~lr * sign(g), so f32 reduction-order noise in tiny gradients
  # shows up at ~1e-6 in the params: compare at 2e-5 (the update itself is ~1e-3).
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params,
                         ref_params)
  moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), params,
                                 jax.device_get(loop.create_state(
                                     config_lib.from_configdict(CONFIG),
                                     parallel.make_mesh(config_lib.ParallelConfig(data=1),
                                                        jax.devices()[:1]))[0].params))
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-4  # the step did update the params
  if mesh_shape[1] > 1:  # FSDP: the big kernels really are split over devices
    kernel = state.params["layers"]["mlp"]["wi_gate"]["kernel"]
    assert "fsdp" in str(kernel.sharding.spec)
    assert kernel.addressable_shards[0].data.size < kernel.size


def test_gradient_accumulation_equals_full_batch(single_device):
  loss, params, _ = _one_step((1, 1, 1), microbatches=4)
  np.testing.assert_allclose(loss, single_device[0], rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params,
                         single_device[1])


def test_mesh_that_does_not_fit_the_devices_names_the_fix():
  with pytest.raises(config_lib.ConfigError, match="config.parallel"):
    parallel.make_mesh(config_lib.ParallelConfig(data=3, fsdp=1, tensor=1), jax.devices())


def test_logical_spec_drops_axes_that_do_not_divide():
  mesh = parallel.make_mesh(config_lib.ParallelConfig(data=2, fsdp=2, tensor=2), jax.devices())
  assert parallel.logical_to_spec(("embed", "mlp"), (8, 6), mesh) == jax.sharding.PartitionSpec(
      "fsdp", "tensor")
  assert parallel.logical_to_spec(("embed", "heads"), (7, 3), mesh) == \
      jax.sharding.PartitionSpec(None, None)
