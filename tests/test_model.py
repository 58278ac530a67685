"""Decoder model: causality, packing isolation, KV cache, scan/remat/dtype variants.

Compile time dominates on CPU, so params are drawn without compiling `init`
(helpers.random_params) and each variant's jitted functions are built once per file.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import config as config_lib
from llm.inference import init_cache
from llm.models import build
from tests.helpers import (GPT_TINY, LLAMA_TINY, embedding_dependence, model_and_random_params)

VARIANTS = {"gpt": GPT_TINY, "llama": LLAMA_TINY}
B, T = 2, 16


@functools.lru_cache(maxsize=None)
def variant(name, **overrides):
  """(jitted module, params): cached so every test of a variant shares one compile."""
  return model_and_random_params(**VARIANTS[name], **overrides)


def forward(name, tokens_BT, positions_BT=None, segment_ids_BT=None):
  """Logits at (B, T) with explicit positions and segments: one compiled shape per variant."""
  module, params = variant(name)
  if positions_BT is None:
    positions_BT = np.tile(np.arange(tokens_BT.shape[1]), (tokens_BT.shape[0], 1))
  if segment_ids_BT is None:
    segment_ids_BT = np.ones(tokens_BT.shape, np.int32)
  return module.apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT)


def random_tokens(seed, shape=(B, T)):
  return np.random.default_rng(seed).integers(1, 64, shape).astype(np.int32)


@pytest.mark.parametrize("name", VARIANTS)
def test_causality_gradient_is_zero_for_future_tokens(name):
  module, params = variant(name)
  dependence_TS = embedding_dependence(module.module, params, random_tokens(1, (1, 12)))
  past = np.tril(np.ones((12, 12), bool))
  assert (dependence_TS[past] > 0).all()  # every earlier position reaches t
  np.testing.assert_array_equal(dependence_TS[~past], 0.0)  # no later one does


def test_input_embeddings_replace_the_token_lookup():
  module, params = variant("gpt")
  tokens = random_tokens(3)
  positions, segments = np.tile(np.arange(T), (B, 1)), np.ones((B, T), np.int32)
  embeds = np.asarray(params["embed"]["embedding"])[tokens]
  np.testing.assert_array_equal(
      module.apply({"params": params}, None, positions, segments, inputs_embeds_BTD=embeds),
      forward("gpt", tokens))
  with pytest.raises(ValueError, match="either tokens or inputs_embeds_BTD"):
    module.apply({"params": params}, tokens, positions, segments, inputs_embeds_BTD=embeds)


@pytest.mark.parametrize("name", VARIANTS)
def test_packed_segments_do_not_attend_across_documents(name):
  rng = np.random.default_rng(0)
  doc_a, doc_b = rng.integers(1, 64, 7), rng.integers(1, 64, 9)
  # The two documents packed in both orders: each one first in a row (where only
  # causality limits what it sees) and second behind the other.
  packed = np.stack([np.concatenate([doc_a, doc_b]), np.concatenate([doc_b, doc_a])])
  segments = np.array([[1] * 7 + [2] * 9, [1] * 9 + [2] * 7])
  positions = np.array([list(range(7)) + list(range(9)), list(range(9)) + list(range(7))])
  logits = forward(name, packed, positions, segments)
  np.testing.assert_allclose(logits[0, 7:], logits[1, :9], atol=1e-5)
  np.testing.assert_allclose(logits[1, 9:], logits[0, :7], atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_decoding_matches_full_forward_at_every_step(name):
  module, params = variant(name)
  tokens = random_tokens(2)
  full = forward(name, tokens)
  cache = init_cache(module, B, T)
  prefill = 4
  ones = np.ones((B, prefill), np.int32)
  logits, mutated = module.apply({"params": params, "cache": cache}, tokens[:, :prefill],
                                 np.cumsum(ones, 1) - 1, ones, decode=True, mutable=["cache"])
  np.testing.assert_allclose(logits, full[:, :prefill], atol=1e-5)
  for t in range(prefill, T):
    logits, mutated = module.apply(
        {"params": params, "cache": mutated["cache"]}, tokens[:, t:t + 1],
        np.full((B, 1), t), np.ones((B, 1), np.int32), decode=True, mutable=["cache"])
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


SCAN_TOKENS = np.arange(1, 13)[None]
# A fixed random cotangent: every logit enters the loss with its own weight, so the
# gradient of every param depends on the whole backward pass (d mean(logits) would not).
COTANGENT = np.random.default_rng(5).normal(size=(1, 12, 64)).astype(np.float32)


def _logits_and_grads(module, params, tokens):
  """(logits, d sum(logits * COTANGENT) / d params) in one compiled call."""
  def loss(p):
    logits = module.apply({"params": p}, tokens)
    return (logits * COTANGENT).sum(), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


def _rematerializes(module, params) -> bool:
  """Whether the backward pass of `module` recomputes (a remat / checkpoint region)."""
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: module.apply({"params": p}, SCAN_TOKENS).sum()))
  return any(name in str(jaxpr(params)) for name in ("remat", "checkpoint"))


@functools.lru_cache(maxsize=None)
def _scanned_logits_and_grads():
  module, params = variant("llama")
  return _logits_and_grads(module.module, params, SCAN_TOKENS)


def _unstack_layers(scanned, num_layers):
  params = {k: v for k, v in scanned.items() if k != "layers"}
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], scanned["layers"])
  return params


@pytest.mark.parametrize("overrides", [dict(scan_layers=False), dict(remat="full"),
                                       dict(remat="dots", scan_layers=False)])
def test_scan_and_remat_variants_compute_the_same_function(overrides):
  """Remat changes only the backward pass: compare the gradients with those of the
  scanned model without remat, and check the backward really does recompute."""
  module, scanned = variant("llama")
  other = build(config_lib.model_from_dict(dict(LLAMA_TINY, **overrides)))
  params, num_layers = scanned, LLAMA_TINY["num_layers"]
  if not overrides.get("scan_layers", True):
    params = _unstack_layers(scanned, num_layers)
  other_shapes = nn.unbox(jax.eval_shape(other.init, jax.random.PRNGKey(0), SCAN_TOKENS))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      other_shapes["params"])
  assert _rematerializes(other, params) == ("remat" in overrides)
  logits, grads = _logits_and_grads(other, params, SCAN_TOKENS)
  want_logits, want_grads = _scanned_logits_and_grads()
  np.testing.assert_allclose(logits, want_logits, atol=1e-5)
  if not overrides.get("scan_layers", True):
    want_grads = _unstack_layers(want_grads, num_layers)
  jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
                         grads, want_grads)
  assert min(np.abs(g).max() for g in jax.tree_util.tree_leaves(grads)) > 1e-3  # none vanish


def _matmul_dtypes(module, params, tokens) -> set:
  """The operand dtypes of every dot_general in the forward pass, scan bodies included."""
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            walk(inner)
  walk(jax.make_jaxpr(lambda p: module.apply({"params": p}, tokens))(params).jaxpr)
  return found


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_computes_in_the_low_dtype_with_float32_params(dtype):
  """Params stay float32, every matmul runs in `dtype`, and the logits differ from the
  float32 model's by what that dtype's rounding gives: more than float32 noise (so the
  low dtype is used) and less than a few of its epsilons (bfloat16's error would fail
  float16's bound)."""
  _, params = variant("llama")
  low, _ = variant("llama", dtype=dtype)
  shapes = jax.eval_shape(low.init, jax.random.PRNGKey(0), np.ones((1, 8), np.int32))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes["params"]))
  tokens = random_tokens(3)
  assert _matmul_dtypes(low.module, params, tokens) == {(dtype, dtype)}
  assert _matmul_dtypes(variant("llama")[0].module, params, tokens) == {("float32", "float32")}
  positions, segments = np.tile(np.arange(T), (B, 1)), np.ones((B, T), np.int32)
  ref = np.asarray(forward("llama", tokens, positions, segments))
  out = np.asarray(low.apply({"params": params}, tokens, positions, segments))
  error, eps = np.abs(out - ref).max() / np.abs(ref).max(), float(jnp.finfo(dtype).eps)
  assert eps / 16 < error < 2 * eps, (error, eps)


def test_params_in_bfloat16_compute_what_float32_gives_their_rounded_values():
  """param_dtype=bfloat16 with float32 compute: params are bfloat16 and the model is the
  float32 one applied to them (no compute in bfloat16, no other change)."""
  _, params = variant("gpt")
  low, _ = variant("gpt", param_dtype="bfloat16")
  shapes = jax.eval_shape(low.init, jax.random.PRNGKey(0), np.ones((1, 8), np.int32))
  assert {str(x.dtype) for x in jax.tree_util.tree_leaves(shapes["params"])} == {"bfloat16"}
  rounded = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  tokens = random_tokens(4)
  positions, segments = np.tile(np.arange(T), (B, 1)), np.ones((B, T), np.int32)
  out = np.asarray(low.apply({"params": rounded}, tokens, positions, segments))
  as_f32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), rounded)
  f32_model = variant("gpt")[0]
  np.testing.assert_allclose(
      out, f32_model.apply({"params": as_f32}, tokens, positions, segments), atol=1e-5)
  # ... and not the unrounded params' output: the params really are held in bfloat16.
  assert np.abs(out - forward("gpt", tokens, positions, segments)).max() > 1e-4


def test_dropout_changes_training_forwards_only():
  """dropout > 0: a training forward differs from the deterministic one and between
  dropout keys, is reproducible for one key; the deterministic forward is exactly the
  dropout-free model's."""
  _, params = variant("gpt")
  drop, _ = variant("gpt", dropout=0.1)
  tokens = random_tokens(6)
  positions, segments = np.tile(np.arange(T), (B, 1)), np.ones((B, T), np.int32)
  args = ({"params": params}, tokens, positions, segments)
  np.testing.assert_array_equal(drop.apply(*args, deterministic=True),
                                forward("gpt", tokens, positions, segments))
  train = lambda seed: np.asarray(drop.apply(*args, deterministic=False,
                                             rngs={"dropout": jax.random.PRNGKey(seed)}))
  a, again, b = train(0), train(0), train(1)
  np.testing.assert_array_equal(a, again)
  deterministic = np.asarray(forward("gpt", tokens, positions, segments))
  for sample in (a, b):
    assert np.abs(sample - deterministic).max() > 1e-3
  assert np.abs(a - b).max() > 1e-3
