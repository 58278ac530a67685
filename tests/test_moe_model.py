"""MoE inside the decoder: trains through the one train step, reports its routing."""

import jax
import numpy as np

from llm import config as config_lib
from llm import parallel
from llm.train import loop
from tests.helpers import GPT_TINY, random_batch


def test_moe_decoder_trains_and_reports_drops_and_load():
  cfg = config_lib.from_configdict({
      "model": dict(GPT_TINY, moe=dict(num_experts=4, top_k=2, capacity_factor=1.0)),
      "data": dict(seq_len=16, batch_size=8), "train": dict(steps=10, warmup_steps=1),
      "parallel": dict(data=2, fsdp=2, tensor=2)})
  mesh = parallel.make_mesh(cfg.parallel)
  state, shardings = loop.create_state(cfg, mesh)
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
