"""MoE inside the decoder: trains through the one train step, reports its routing.

Params come from helpers.random_params (no `init` compile, which costs several times a
forward pass on CPU)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from llm import config as config_lib
from llm import parallel
from llm.models import apply_batch, build
from llm.models.blocks import unscanned
from llm.train import loop
from tests.helpers import GPT_TINY, random_batch, random_params


def test_moe_decoder_trains_and_reports_drops_and_load():
  cfg = config_lib.from_configdict({
      "model": dict(GPT_TINY, moe=dict(num_experts=4, top_k=2, capacity_factor=1.0)),
      "data": dict(seq_len=16, batch_size=8), "train": dict(steps=10, warmup_steps=1),
      "parallel": dict(data=2, fsdp=2, tensor=2)})
  mesh = parallel.make_mesh(cfg.parallel)
  params = random_params(build(cfg.model), np.ones((1, 8), np.int32))
  state, shardings = loop.create_state(cfg, mesh, params)
  train_fn, _ = loop.compiled_steps(shardings, mesh)
  batch = parallel.shard_batch(random_batch(), mesh)
  losses = []
  for _ in range(4):
    state, metrics = train_fn(state, batch)
    losses.append(float(metrics["train_loss"]))
  assert losses[-1] < losses[0]
  load = np.asarray(metrics["moe_expert_load"])
  assert load.shape == (4,) and abs(load.sum() - 1) < 1e-5
  assert 0.0 <= float(metrics["moe_dropped_fraction"]) < 0.5
  assert float(metrics["moe_aux_loss"]) > 0
  router = jax.device_get(state.params["layers"]["moe"]["router"]["kernel"])
  assert np.abs(router).sum() > 0


def test_moe_every_second_layer_and_in_the_encoder_decoder():
  dense_then_moe = build(config_lib.model_from_dict(dict(
      GPT_TINY, scan_layers=False, moe=dict(num_experts=4, top_k=1, every=2))))
  shapes = jax.eval_shape(dense_then_moe.init, jax.random.PRNGKey(0), np.ones((1, 8), np.int32))
  assert "mlp" in shapes["params"]["layers_0"] and "moe" in shapes["params"]["layers_1"]
  seq2seq = config_lib.model_from_dict(dict(
      GPT_TINY, family="encoder_decoder", positions="relative", norm="rmsnorm",
      use_bias=False, scale_attention=False, moe=dict(num_experts=4, top_k=2)))
  module = build(seq2seq)
  tokens = np.ones((2, 8), np.int32)
  params = random_params(module, tokens, tokens)
  assert "moe" in params["encoder"]["layers"] and "moe" in params["decoder"]["layers"]
  batch = {"encoder_inputs": tokens, "encoder_segment_ids": tokens, "inputs": tokens}
  logits, aux = jax.jit(lambda p, b: apply_batch(module, p, b))(params, batch)
  assert logits.shape == (2, 8, 64) and float(aux["moe_aux_loss"]) > 0
  with pytest.raises(config_lib.ConfigError, match="moe.every=3: must divide model.num_layers"):
    config_lib.model_from_dict(dict(GPT_TINY, moe=dict(num_experts=4, every=3)))


def test_scanned_groups_of_dense_and_moe_layers_equal_the_unscanned_stack():
  cfg = config_lib.model_from_dict(dict(GPT_TINY, num_layers=4,
                                        moe=dict(num_experts=4, top_k=2, every=2)))
  module = build(cfg)
  tokens = np.arange(1, 13)[None]
  params = random_params(module, tokens)
  assert set(params["layers"]) == {"block_0", "block_1"}
  assert "mlp" in params["layers"]["block_0"] and "moe" in params["layers"]["block_1"]
  flat_module, flat_params = unscanned(module, params)
  assert "mlp" in flat_params["layers_2"] and "moe" in flat_params["layers_3"]
  flat_shapes = nn.unbox(jax.eval_shape(flat_module.init, jax.random.PRNGKey(0), tokens))
  assert (jax.tree_util.tree_structure(flat_params) ==
          jax.tree_util.tree_structure(flat_shapes["params"]))
  np.testing.assert_allclose(jax.jit(flat_module.apply)({"params": flat_params}, tokens),
                             jax.jit(module.apply)({"params": params}, tokens), atol=1e-5)
