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


def _logits_and_grads(module, params, tokens):
  """(logits, d mean(logits) / d params) in one compiled call."""
  def loss(p):
    logits = module.apply({"params": p}, tokens)
    return logits.mean(), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


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
  _, scanned = variant("llama")
  other = build(config_lib.model_from_dict(dict(LLAMA_TINY, **overrides)))
  params, num_layers = scanned, LLAMA_TINY["num_layers"]
  if not overrides.get("scan_layers", True):
    params = _unstack_layers(scanned, num_layers)
  other_shapes = nn.unbox(jax.eval_shape(other.init, jax.random.PRNGKey(0), SCAN_TOKENS))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      other_shapes["params"])
  logits, grads = _logits_and_grads(other, params, SCAN_TOKENS)
  want_logits, want_grads = _scanned_logits_and_grads()
  np.testing.assert_allclose(logits, want_logits, atol=1e-5)
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
  if not overrides.get("scan_layers", True):
    want_grads = _unstack_layers(want_grads, num_layers)
  jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-7),
                         grads, want_grads)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_keeps_params_float32_and_logits_close(dtype):
  _, params = variant("llama")
  low, _ = variant("llama", dtype=dtype)
  shapes = jax.eval_shape(low.init, jax.random.PRNGKey(0), np.ones((1, 8), np.int32))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes["params"]))
  tokens = random_tokens(3)
  positions, segments = np.tile(np.arange(T), (B, 1)), np.ones((B, T), np.int32)
  ref = forward("llama", tokens, positions, segments)
  out = low.apply({"params": params}, tokens, positions, segments)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.05)
