"""Decoder model: causality, packing isolation, KV cache, scan/remat/dtype variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.inference import init_cache
from tests.helpers import GPT_TINY, LLAMA_TINY, model_and_params

VARIANTS = {"gpt": GPT_TINY, "llama": LLAMA_TINY}


@pytest.mark.parametrize("name", VARIANTS)
def test_causality_gradient_is_zero_for_future_tokens(name):
  module, params = model_and_params(**VARIANTS[name])
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 12), 1, 64)
  t = 5
  grad_TD = _input_gradient(module, params, tokens, t)
  assert np.abs(grad_TD[: t + 1]).sum() > 0
  np.testing.assert_array_equal(grad_TD[t + 1:], 0.0)


def _input_gradient(module, params, tokens, t):
  """|d(logits at t) / d(input embedding at each position)|, summed over features."""
  perturbations = jax.jit(module.init)(jax.random.PRNGKey(0), tokens)["perturbations"]

  def logits_at_t(perturb):
    logits = module.apply({"params": params, "perturbations": perturb}, tokens)
    return logits[0, t].sum()
  grads = jax.grad(logits_at_t)(perturbations)["embedded"]
  return np.abs(np.asarray(grads[0])).sum(-1)


@pytest.mark.parametrize("name", VARIANTS)
def test_packed_segments_do_not_attend_across_documents(name):
  module, params = model_and_params(**VARIANTS[name])
  rng = np.random.default_rng(0)
  doc_a, doc_b = rng.integers(1, 64, 7), rng.integers(1, 64, 9)
  packed = np.concatenate([doc_a, doc_b])[None]
  segments = np.array([[1] * 7 + [2] * 9])
  positions = np.array([list(range(7)) + list(range(9))])
  logits = module.apply({"params": params}, packed, positions, segments)
  alone_b = module.apply({"params": params}, doc_b[None])
  alone_a = module.apply({"params": params}, doc_a[None])
  np.testing.assert_allclose(logits[0, 7:], alone_b[0], atol=1e-5)
  np.testing.assert_allclose(logits[0, :7], alone_a[0], atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_decoding_matches_full_forward_at_every_step(name):
  module, params = model_and_params(**VARIANTS[name])
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (2, 14), 1, 64))
  full = module.apply({"params": params}, tokens)
  cache = init_cache(module, 2, 14)
  prefill = 4
  ones = np.ones((2, prefill), np.int32)
  logits, mutated = module.apply({"params": params, "cache": cache}, tokens[:, :prefill],
                                 np.cumsum(ones, 1) - 1, ones, decode=True, mutable=["cache"])
  np.testing.assert_allclose(logits, full[:, :prefill], atol=1e-5)
  for t in range(prefill, 14):
    logits, mutated = module.apply(
        {"params": params, "cache": mutated["cache"]}, tokens[:, t:t + 1],
        np.full((2, 1), t), np.ones((2, 1), np.int32), decode=True, mutable=["cache"])
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


@pytest.mark.parametrize("overrides", [dict(scan_layers=False), dict(remat="full"),
                                       dict(remat="dots", scan_layers=False)])
def test_scan_and_remat_variants_compute_the_same_function(overrides):
  module, params = model_and_params(**LLAMA_TINY)
  other, other_params = model_and_params(**LLAMA_TINY, **overrides)
  scanned = params
  if not overrides.get("scan_layers", True):  # unstack the scanned layer params
    params = {k: v for k, v in params.items() if k != "layers"}
    for i in range(module.cfg.num_layers):
      params[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], scanned["layers"])
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(other_params)
  tokens = np.arange(1, 13)[None]
  np.testing.assert_allclose(other.apply({"params": params}, tokens),
                             module.apply({"params": scanned}, tokens), atol=1e-5)

  def loss(p):
    return other.apply({"params": p}, tokens).mean()
  grads = jax.grad(loss)(params)
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_keeps_params_float32_and_logits_close(dtype):
  module, params = model_and_params(**LLAMA_TINY)
  low, low_params = model_and_params(**LLAMA_TINY, dtype=dtype)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(low_params))
  tokens = np.arange(1, 13)[None]
  ref = module.apply({"params": params}, tokens)
  out = low.apply({"params": params}, tokens)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.05)
