"""Mixture-of-experts layer: routing and capacity, aux losses, stats, and equality with the
dense MLP when there is one expert."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import config as config_lib
from llm.layers.mlp import MLP
from llm.layers.moe import (STATS, MoE, collect_moe_stats, expert_capacity,
                            load_balancing_loss, router_probs, router_z_loss, top_k_routing)

TINY = dict(d_model=16, d_ff=32, num_heads=2)


def make_cfg(moe=None, **model):
  return config_lib.model_from_dict(dict(TINY, **model, moe=dict(moe or {})))


def init_params(module, x, seed=0):
  """Random params of the module's shapes. Compiling `init` costs seconds on CPU (the
  RNG), so the values come from numpy; nonzero biases test the bias paths too."""
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype), shapes)


# Jitted: eagerly, every op compiles on first use, which costs seconds per test on CPU.
route = jax.jit(top_k_routing, static_argnames=("k", "capacity", "renormalize"))
load_balancing_loss = jax.jit(load_balancing_loss)
router_z_loss = jax.jit(router_z_loss)


def applier(module):
  """Jitted apply returning (y, moe_stats collection)."""
  def apply(params, x, *valid_BT):
    y, mutated = module.apply({"params": params}, x, True, *valid_BT, mutable=[STATS])
    return y, mutated[STATS]
  return jax.jit(apply)


def inputs(batch=2, length=8, seed=1):
  shape = (batch, length, TINY["d_model"])
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------- layer


@pytest.mark.parametrize("activation,use_bias", [("gelu", True), ("swiglu", False)])
def test_single_expert_equals_dense_mlp(activation, use_bias):
  cfg = make_cfg(dict(num_experts=1, top_k=1, capacity_factor=1.0), activation=activation,
                 use_bias=use_bias)
  x = inputs()
  mlp = MLP(cfg)
  mlp_params = init_params(mlp, x)
  moe = MoE(cfg)
  moe_params = dict(init_params(moe, x))
  for name, weights in mlp_params.items():  # dense (D, F) -> one stacked expert (1, D, F)
    moe_params[name] = jax.tree_util.tree_map(lambda w: w[None], weights)
  dense = jax.jit(mlp.apply)({"params": mlp_params}, x)
  y, stats = applier(moe)(moe_params, x)
  np.testing.assert_allclose(y, dense, atol=1e-5)
  assert float(collect_moe_stats(stats)["dropped_fraction"]) == 0.0


def test_capacity_drops_tokens_and_dropped_tokens_get_zero_output():
  x = inputs(batch=2, length=16)
  # Both configs share the param shapes, so one set of weights serves both.
  roomy = MoE(make_cfg(dict(num_experts=4, top_k=1, capacity_factor=100.0)))
  tight = MoE(make_cfg(dict(num_experts=4, top_k=1, capacity_factor=0.25)))
  params = init_params(roomy, x)
  y_roomy, stats_roomy = applier(roomy)(params, x)
  y_tight, stats_tight = applier(tight)(params, x)
  assert float(collect_moe_stats(stats_roomy)["dropped_fraction"]) == 0.0
  dropped = float(collect_moe_stats(stats_tight)["dropped_fraction"])
  assert 0.0 < dropped < 1.0

  # Replay the routing to know which tokens lost their (only) choice.
  @jax.jit
  def kept(x_BTD, router_DE):
    probs_BTE = router_probs(jnp.einsum("btd,de->bte", x_BTD, router_DE))
    capacity = expert_capacity(16, 4, 1, 0.25)
    dispatch_BTEC, _, _ = jax.vmap(lambda p: top_k_routing(p, 1, capacity))(probs_BTE)
    return dispatch_BTEC.any(axis=(2, 3))
  kept_BT = np.asarray(kept(x, params["router"]["kernel"]))
  assert np.mean(~kept_BT) == pytest.approx(dropped)
  np.testing.assert_array_equal(np.asarray(y_tight)[~kept_BT], 0.0)
  np.testing.assert_allclose(np.asarray(y_tight)[kept_BT], np.asarray(y_roomy)[kept_BT],
                             atol=1e-6)


@pytest.mark.parametrize("top_k,renormalize", [(2, True), (1, False)])
def test_router_gets_gradient_through_the_combine_weights(top_k, renormalize):
  # No aux losses, so any router gradient comes through the gates that scale the output.
  moe = dict(num_experts=4, top_k=top_k, renormalize=renormalize, aux_loss_weight=0.0,
             z_loss_weight=0.0)
  module = MoE(make_cfg(moe))
  x = inputs()
  params = init_params(module, x)

  @jax.jit
  def grad_router(params):
    return jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x) ** 2))(params)["router"]
  g = np.asarray(grad_router(params)["kernel"])
  assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_uniform_router_has_balance_loss_one_and_stats_are_sown():
  cfg = make_cfg(dict(num_experts=4, top_k=2, aux_loss_weight=1.0, z_loss_weight=0.0))
  module = MoE(cfg)
  x = inputs()
  params = init_params(module, x)
  params["router"]["kernel"] = np.zeros(params["router"]["kernel"].shape, np.float32)
  _, stats = applier(module)(params, x)
  assert stats["aux_loss"][0].shape == () and stats["expert_load"][0].shape == (4,)
  collected = collect_moe_stats(stats)
  assert float(collected["aux_loss"]) == pytest.approx(1.0, abs=1e-6)
  assert float(np.sum(collected["expert_load"])) == pytest.approx(1.0, abs=1e-6)


def test_padding_takes_no_slots_and_leaves_losses_and_stats_unchanged():
  # The same six tokens padded on the left (as generate does) and on the right.
  module = MoE(make_cfg(dict(num_experts=4, top_k=2, capacity_factor=100.0)))
  x = inputs(batch=1, length=6)
  pad = np.ones_like(x[:, :3])
  left, right = np.concatenate([pad, x], 1), np.concatenate([x, pad], 1)
  params = init_params(module, left)
  apply = applier(module)
  y_left, stats_left = apply(params, left, np.arange(9)[None] >= 3)
  y_right, stats_right = apply(params, right, np.arange(9)[None] < 6)
  np.testing.assert_array_equal(y_left[:, :3], 0.0)
  np.testing.assert_array_equal(y_right[:, 6:], 0.0)
  np.testing.assert_allclose(y_left[:, 3:], y_right[:, :6], atol=1e-6)
  for name, value in collect_moe_stats(stats_right).items():
    np.testing.assert_allclose(collect_moe_stats(stats_left)[name], value, rtol=1e-6)


def test_padding_cannot_take_capacity_from_later_tokens():
  probs_GE = np.tile(np.float32([0.9, 0.1]), (4, 1))
  valid_G = np.array([False, False, True, True])
  dispatch_GEC, _, stats = route(probs_GE, k=1, capacity=2, valid_G=valid_G)
  np.testing.assert_array_equal(dispatch_GEC[:, 0], [[0, 0], [0, 0], [1, 0], [0, 1]])
  assert float(stats["dropped_fraction"]) == 0.0
  np.testing.assert_allclose(stats["expert_load"], [1.0, 0.0])


def test_stats_are_not_recorded_unless_asked_for():
  module = MoE(make_cfg(dict(num_experts=4)))
  x = inputs()
  y = jax.jit(module.apply)({"params": init_params(module, x)}, x)
  assert y.shape == x.shape
  assert collect_moe_stats({}) == {}


@pytest.mark.parametrize("activation,use_bias", [("gelu", True), ("geglu", False)])
def test_expert_kernels_have_expert_as_first_logical_axis(activation, use_bias):
  module = MoE(make_cfg(dict(num_experts=4), activation=activation, use_bias=use_bias))
  boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), inputs())["params"]
  names = {"/".join(k.key for k in path): leaf.names
           for path, leaf in jax.tree_util.tree_leaves_with_path(
               boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))}
  inputs_ = ("wi",) if activation == "gelu" else ("wi_gate", "wi_up")
  expected = {"router/kernel": ("embed", None), "wo/kernel": ("expert", "mlp", "embed")}
  expected.update({f"{n}/kernel": ("expert", "embed", "mlp") for n in inputs_})
  if use_bias:
    expected["wo/bias"] = ("expert", "embed")
    expected.update({f"{n}/bias": ("expert", "mlp") for n in inputs_})
  assert names == expected
  assert boxed["wo"]["kernel"].value.shape == (4, TINY["d_ff"], TINY["d_model"])


def test_scanned_layers_stack_stats_and_collect_sums_aux_losses():
  cfg = make_cfg(dict(num_experts=4, top_k=2, capacity_factor=0.5))
  num_layers = 3

  class Residual(nn.Module):
    cfg: config_lib.ModelConfig

    @nn.compact
    def __call__(self, x, _):
      return x + MoE(self.cfg, name="moe")(x), None

  class Stack(nn.Module):  # the way block_stack scans (and rematerializes) blocks
    cfg: config_lib.ModelConfig

    @nn.compact
    def __call__(self, x, deterministic=True):
      layer = nn.remat(Residual, prevent_cse=False)
      scanned = nn.scan(layer, variable_axes={"params": 0, STATS: 0},
                        split_rngs={"params": True}, in_axes=(nn.broadcast,),
                        length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      return scanned(self.cfg, name="layers")(x, None)[0]

  module = Stack(cfg)
  x = inputs()
  _, stats = applier(module)(init_params(module, x), x)
  per_layer = stats["layers"]["moe"]
  assert per_layer["aux_loss"][0].shape == (num_layers,)
  assert per_layer["expert_load"][0].shape == (num_layers, 4)
  collected = collect_moe_stats(stats)
  np.testing.assert_allclose(collected["aux_loss"], np.sum(per_layer["aux_loss"][0]), rtol=1e-6)
  np.testing.assert_allclose(collected["dropped_fraction"],
                             np.mean(per_layer["dropped_fraction"][0]), rtol=1e-6)
  np.testing.assert_allclose(collected["expert_load"], np.mean(per_layer["expert_load"][0], 0),
                             rtol=1e-6)
  assert float(collected["dropped_fraction"]) > 0


# ----------------------------------------------------------------------------- routing


def test_first_choices_claim_slots_before_second_choices():
  # Each token's first choice is its own expert; its second is someone else's first.
  probs_GE = np.float32([[0.6, 0.3, 0.1],
                        [0.3, 0.6, 0.1],
                        [0.1, 0.3, 0.6]])
  dispatch_GEC, combine_GEC, stats = route(probs_GE, k=2, capacity=1, renormalize=False)
  np.testing.assert_array_equal(dispatch_GEC[:, :, 0], np.eye(3, dtype=bool))
  np.testing.assert_allclose(combine_GEC[:, :, 0], np.eye(3) * 0.6)
  assert float(stats["dropped_fraction"]) == pytest.approx(0.5)
  np.testing.assert_allclose(stats["expert_load"], [1 / 3, 1 / 2, 1 / 6], rtol=1e-6)


def test_top2_renormalized_combine_weights_sum_to_one_without_drops():
  logits_GE = np.random.default_rng(0).normal(size=(32, 8))
  probs_GE = (np.exp(logits_GE) / np.exp(logits_GE).sum(-1, keepdims=True)).astype(np.float32)
  dispatch_GEC, combine_GEC, stats = route(probs_GE, k=2, capacity=32)
  np.testing.assert_allclose(combine_GEC.sum((1, 2)), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(dispatch_GEC.sum((1, 2)), 2)
  assert np.all(dispatch_GEC.sum(0) <= 1)  # one token per slot
  assert float(stats["dropped_fraction"]) == 0.0
  assert float(stats["expert_load"].sum()) == pytest.approx(1.0)
  np.testing.assert_array_equal(stats["expert_mask"].sum(-1), 2)

  _, raw_GEC, _ = route(probs_GE, k=2, capacity=32, renormalize=False)
  top2_G = np.sort(probs_GE, axis=-1)[:, -2:].sum(-1)
  np.testing.assert_allclose(raw_GEC.sum((1, 2)), top2_G, rtol=1e-6)


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_skewed():
  num_tokens, num_experts = 8, 4
  one_hot = lambda experts_G: np.eye(num_experts, dtype=np.float32)[experts_G]
  uniform_GE = np.full((num_tokens, num_experts), 1 / num_experts, np.float32)
  balanced_GE = one_hot(np.arange(num_tokens) % num_experts)
  assert float(load_balancing_loss(uniform_GE, balanced_GE)) == pytest.approx(1.0)
  top2_GE = balanced_GE + one_hot((np.arange(num_tokens) + 1) % num_experts)
  assert float(load_balancing_loss(uniform_GE, top2_GE)) == pytest.approx(1.0)

  skewed_GE = np.tile(np.float32([0.7, 0.1, 0.1, 0.1]), (num_tokens, 1))
  all_to_first_GE = one_hot(np.zeros(num_tokens, np.int32))
  assert float(load_balancing_loss(skewed_GE, all_to_first_GE)) == pytest.approx(4 * 0.7)
  assert float(load_balancing_loss(all_to_first_GE, all_to_first_GE)) == pytest.approx(4.0)


def test_router_z_loss_on_known_values():
  assert float(router_z_loss(np.zeros((5, 4), np.float32))) == pytest.approx(np.log(4) ** 2)
  logits_GE = np.float32([[0.0, np.log(3.0)], [np.log(2.0), np.log(2.0)]])  # lse: log 4, log 4
  assert float(router_z_loss(logits_GE)) == pytest.approx(np.log(4) ** 2)
  logits_GE = np.float32([[0.0, np.log(3.0)], [-100.0, 0.0]])  # lse: log 4, ~0
  assert float(router_z_loss(logits_GE)) == pytest.approx(np.log(4) ** 2 / 2, rel=1e-5)


@pytest.mark.parametrize("tokens,experts,k,factor,expected", [
    (16, 4, 1, 1.0, 4), (16, 4, 2, 1.25, 10), (16, 4, 2, 100.0, 16), (1, 8, 2, 1.25, 1),
    (16, 8, 1, 0.01, 1)])
def test_expert_capacity(tokens, experts, k, factor, expected):
  assert expert_capacity(tokens, experts, k, factor) == expected


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("moe,field", [
    (dict(num_experts=2, top_k=3), "config.model.moe.top_k"),
    (dict(num_experts=4, capacity_factor=0.0), "config.model.moe.capacity_factor"),
    (dict(num_experts=4, capacity_factor=-1.0), "config.model.moe.capacity_factor")])
def test_config_rejects_bad_moe_fields(moe, field):
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    make_cfg(moe)
