"""Sharded training equals single-device training for every family on several meshes;
a checkpoint restores onto another mesh and device count; bad meshes fail in one line.

Each (family, mesh) train step is compiled once (module-scoped cache) at XLA:CPU's lowest
backend optimisation level, which halves compile time and leaves the HLO, and so the
sharding and the arithmetic, as they are. States are placed from one host-side state per
family, so no `init` is compiled per mesh.
"""

import types

import jax
import numpy as np
import optax
import pytest

from llm import config as config_lib
from llm import parallel
from llm.train import checkpoint as ckpt
from llm.train import loop
from tests.helpers import GPT_TINY, LLAMA_TINY, random_params

BERT_TINY = dict(GPT_TINY, family="encoder", post_norm=True, embed_norm=True, type_vocab_size=2)
T5_TINY = dict(GPT_TINY, family="encoder_decoder", num_decoder_layers=2, positions="relative",
               norm="rmsnorm", use_bias=False, activation="geglu", scale_attention=False,
               tie_embeddings=False)
# A LLaMA-style decoder whose second layer is a mixture of experts: the dense decoder
# and MoE families in one compile (a dense block, then a MoE block, scanned as a group).
DECODER_MOE = dict(LLAMA_TINY, moe=dict(num_experts=4, top_k=2, every=2, capacity_factor=2.0))
# family: (model, objective, meshes as (data, fsdp, tensor, expert)). Between them: every
# axis alone and in pairs and all three, fsdp and tensor up to all 8 / 4 devices (the
# decoder's three meshes are also the checkpoint test's).
FAMILIES = {
    "decoder_moe": (DECODER_MOE, "clm", [(2, 4, 1, 1), (4, 1, 2, 1), (1, 1, 1, 2)]),
    "encoder": (BERT_TINY, "mlm", [(2, 2, 2, 1), (1, 8, 1, 1)]),
    "encoder_decoder": (T5_TINY, "span", [(4, 2, 1, 1), (1, 2, 4, 1)]),
}
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _batch(seed=0, batch=8, seq_len=16, vocab=64) -> dict:
  rng = np.random.default_rng(seed)
  ids = lambda: rng.integers(1, vocab, (batch, seq_len)).astype(np.int32)
  return {"inputs": ids(), "targets": ids(), "encoder_inputs": ids(),
          "segment_ids": np.ones((batch, seq_len), np.int32),
          "encoder_segment_ids": np.ones((batch, seq_len), np.int32),
          "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)),
          # Token weights far from uniform (a quarter zero, rows weighted 1..64 apart): the
          # loss is one mean over all weighted tokens, so a mean of per-device or
          # per-micro-batch means, or a gradient summed over them, changes loss or gradient.
          "weights": (rng.choice([0.0, 0.5, 1.0, 2.0], (batch, seq_len))
                      * np.arange(1, batch + 1)[:, None] ** 2).astype(np.float32)}


def _config(family, mesh_shape=(1, 1, 1, 1), microbatches=1):
  model, objective, _ = FAMILIES[family]
  data, fsdp, tensor, expert = mesh_shape
  return config_lib.from_configdict({
      "model": model, "data": dict(seq_len=16, batch_size=8, objective=objective),
      "train": dict(steps=10, warmup_steps=1, microbatches=microbatches),
      "parallel": dict(data=data, fsdp=fsdp, tensor=tensor, expert=expert)})


class Family:
  """One family's host-side initial state and its compiled steps, by mesh shape."""

  def __init__(self, family):
    cfg = _config(family)
    self.make = loop.state_factory(cfg)
    module = self.make.args[0]
    inputs = (np.ones((1, 8), np.int32),) * (2 if cfg.model.family == "encoder_decoder" else 1)
    self.host_state = jax.device_get(self.make(params=random_params(module, *inputs)))
    self.steps = {}

  def place(self, state, mesh_shape):
    mesh = self.mesh(mesh_shape)
    return jax.device_put(state, loop.state_shardings(self.make, mesh)), mesh

  def mesh(self, mesh_shape):
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    return parallel.make_mesh(config_lib.ParallelConfig(*mesh_shape), devices)

  def step(self, state, mesh_shape, batch):
    """(new state, metrics, compiled) of one train step of `state` (placed on the mesh)."""
    state, mesh = self.place(state, mesh_shape)
    batch = parallel.shard_batch(batch, mesh)
    if mesh_shape not in self.steps:
      train_fn, _ = loop.compiled_steps(loop.state_shardings(self.make, mesh), mesh)
      self.steps[mesh_shape] = train_fn.lower(state, batch).compile(FAST_COMPILE)
    compiled = self.steps[mesh_shape]
    new_state, metrics = compiled(state, batch)
    return new_state, jax.device_get(metrics), compiled


@pytest.fixture(scope="module")
def families():
  return {}


def _family(families, name) -> Family:
  if name not in families:
    families[name] = Family(name)
  return families[name]


def _assert_same_step(a, b):
  (state_a, metrics_a), (state_b, metrics_b) = a, b
  # grad_norm is the gradient's scale, which Adam's first step hides from the params.
  for key in ("train_loss", "grad_norm", "tokens"):
    np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=2e-5, err_msg=key)
  # Adam's first update is ~lr * sign(g), so f32 reduction-order noise in tiny gradients
  # shows up at ~1e-6 in the params: compare at 2e-5 (the update itself is ~1e-3).
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5),
                         jax.device_get(state_a.params), jax.device_get(state_b.params))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_steps_on_its_meshes_as_on_one_device(families, name):
  family = _family(families, name)
  ref_state, ref_metrics, _ = family.step(family.host_state, (1, 1, 1, 1), _batch())
  initial = jax.device_get(family.host_state.params)
  moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), initial,
                                 jax.device_get(ref_state.params))
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-4  # the step did update the params
  for mesh_shape in FAMILIES[name][2]:
    state, metrics, compiled = family.step(family.host_state, mesh_shape, _batch())
    _assert_same_step((state, metrics), (ref_state, ref_metrics))
    spec = str(jax.tree_util.tree_leaves(state.params)[0].sharding.spec)
    leaves = jax.tree_util.tree_leaves(state.params)
    if mesh_shape[1] > 1 or mesh_shape[2] > 1:  # FSDP / tensor: params really are split
      assert any(x.addressable_shards[0].data.size < x.size for x in leaves), spec
    if mesh_shape[3] > 1:  # each device holds its share of the experts; tokens travel
      wo = state.params["layers"]["block_1"]["moe"]["wo"]["kernel"]
      assert wo.addressable_shards[0].data.shape[1] == 4 // mesh_shape[3]
      assert "all-to-all" in compiled.as_text()


def test_checkpoint_restores_onto_another_mesh_and_device_count(families, tmp_path):
  """Written on (2, 4, 1, 1) over 8 devices; restored onto (4, 1, 2, 1) and onto 2 devices
  (1, 1, 1, 2), the next step's loss and params equal the uninterrupted run's."""
  family = _family(families, "decoder_moe")
  ref_1, _, _ = family.step(family.host_state, (1, 1, 1, 1), _batch())
  ref_2, ref_metrics, _ = family.step(ref_1, (1, 1, 1, 1), _batch(1))
  written, _, _ = family.step(family.host_state, (2, 4, 1, 1), _batch())
  mgr = ckpt.manager(str(tmp_path), keep=1, async_save=False)
  ckpt.save(mgr, 1, written.checkpoint_items(), {"position": 1})
  for mesh_shape in [(4, 1, 2, 1), (1, 1, 1, 2)]:
    mesh = family.mesh(mesh_shape)
    shardings = loop.state_shardings(family.make, mesh)
    abstract = ckpt.abstract_with_shardings(written.checkpoint_items(),
                                            shardings.checkpoint_items())
    items, data_state = ckpt.restore(mgr, abstract, 1)
    assert data_state == {"position": 1} and int(items["step"]) == 1
    kernel = items["params"]["layers"]["block_0"]["mlp"]["wi_gate"]["kernel"]
    assert kernel.sharding.mesh.devices.size == int(np.prod(mesh_shape))
    assert kernel.sharding == shardings.params["layers"]["block_0"]["mlp"]["wi_gate"]["kernel"]
    restored = jax.device_get(family.host_state).replace_items(jax.device_get(items))
    state, metrics, _ = family.step(restored, mesh_shape, _batch(1))
    _assert_same_step((state, metrics), (ref_2, ref_metrics))
  mgr.close()


def test_the_one_device_step_takes_the_gradient_of_the_weighted_mean_loss(families):
  """The reference of every mesh and of accumulation, against sum(w * nll) / sum(w)
  differentiated directly: the loss, the gradient's norm and the params after the update."""
  family = _family(families, "encoder")
  state, batch = family.host_state, _batch()

  def direct(params):
    loss = lambda p: (lambda sums: sums["loss_sum"] / sums["weight_sum"])(
        state.loss_fn(p, state.frozen, batch, None)[0])
    value, grads = jax.value_and_grad(loss)(params)
    updates, _ = state.tx.update(grads, state.opt_state, params)
    return value, optax.tree.norm(grads), optax.apply_updates(params, updates)
  value, grad_norm, params = jax.device_get(
      jax.jit(direct).lower(state.params).compile(FAST_COMPILE)(state.params))
  stepped, metrics, _ = family.step(state, (1, 1, 1, 1), batch)
  _assert_same_step((stepped, metrics), (types.SimpleNamespace(params=params), {
      "train_loss": value, "grad_norm": grad_norm, "tokens": batch["weights"].sum()}))


def test_gradient_accumulation_equals_full_batch(families):
  family = _family(families, "encoder")
  ref_state, ref_metrics, _ = family.step(family.host_state, (1, 1, 1, 1), _batch())
  make = loop.state_factory(_config("encoder", microbatches=4))
  host = jax.device_get(make(params=jax.device_get(family.host_state.params)))
  mesh = family.mesh((1, 1, 1, 1))
  shardings = loop.state_shardings(make, mesh)
  state, batch = jax.device_put(host, shardings), parallel.shard_batch(_batch(), mesh)
  train_fn, _ = loop.compiled_steps(shardings, mesh)
  state, metrics = train_fn.lower(state, batch).compile(FAST_COMPILE)(state, batch)
  _assert_same_step((state, jax.device_get(metrics)), (ref_state, ref_metrics))


def _one_line_error(match, fn, *args):
  with pytest.raises(ValueError, match=match) as info:
    fn(*args)
  assert "\n" not in str(info.value)


def test_bad_meshes_fail_in_one_line_before_compiling():
  P = config_lib.ParallelConfig
  _one_line_error("config.parallel data=3 fsdp=1 tensor=1 needs data x fsdp x tensor = 3 "
                  "devices, but 8 are present", parallel.make_mesh, P(data=3))
  _one_line_error("data=1 fsdp=2 tensor=1 expert=2 needs data x fsdp x tensor x expert = 4 "
                  "devices", parallel.make_mesh, P(data=1, fsdp=2, expert=2))
  _one_line_error("only one axis may be -1", config_lib.from_configdict,
                  {"parallel": dict(data=-1, fsdp=-1)})
  assert parallel.make_mesh(P(data=2, fsdp=-1)).shape["fsdp"] == 4

  def check(shape, batch_size=8, model=DECODER_MOE):
    cfg = config_lib.from_configdict({"model": model, "data": dict(seq_len=16,
                                                                   batch_size=batch_size)})
    parallel.check_fits_mesh(cfg, parallel.make_mesh(P(*shape)))
  _one_line_error("batch_size=12 .* not divisible by the 8 data x fsdp x expert shards",
                  check, (2, 2, 1, 2), 12)
  _one_line_error("num_heads=4 is not divisible by the tensor axis", check, (1, 1, 8, 1))
  _one_line_error("config.parallel.expert=8 is more expert shards than the 4 experts", check,
                  (1, 1, 1, 8))
  _one_line_error("num_experts=12 is not divisible by config.parallel.expert=8", check,
                  (1, 1, 1, 8), 8, dict(DECODER_MOE, moe=dict(num_experts=12)))
  mesh = parallel.make_mesh(P(data=2, fsdp=2, tensor=2))
  _one_line_error("rule 'embed' -> 'model': the mesh has no axis 'model'",
                  parallel.logical_to_spec, ("embed",), (8,), mesh, (("embed", "model"),))
  _one_line_error("logical axis 'width' has no rule", parallel.logical_to_spec, ("width",),
                  (8,), mesh)


def test_logical_spec_drops_axes_that_do_not_divide():
  mesh = parallel.make_mesh(config_lib.ParallelConfig(data=2, fsdp=2, tensor=2))
  P = jax.sharding.PartitionSpec
  assert parallel.logical_to_spec(("embed", "mlp"), (8, 6), mesh) == P("fsdp", "tensor")
  assert parallel.logical_to_spec(("embed", "heads"), (7, 3), mesh) == P(None, None)
  assert parallel.logical_to_spec(("act_batch", "act_vocab"), (8, 64), mesh) == \
      P(("data", "fsdp", "expert"), "tensor")
