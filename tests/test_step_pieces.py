"""The train step's fast pieces against references: the token loss (no argmax, no
masked sum), attention without a group axis and in blocks (the decode step's cache and
new tokens), and the persistent compilation cache."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.compilation_cache import compilation_cache

from llm.layers.attention import (blocked_attention, causal_segment_mask,
                                  dot_product_attention)
from llm.objectives import token_losses
from llm.train.loop import use_compilation_cache


def test_token_losses_match_optax_and_argmax():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 13)).astype(np.float32) * 3
  targets = rng.integers(0, 13, (3, 7))
  targets[0, :4] = logits[0, :4].argmax(-1)  # some correct predictions
  weights = (rng.random((3, 7)) > 0.3).astype(np.float32)
  sums = token_losses(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  reference = lambda l: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
      l, jnp.asarray(targets)) * weights)
  np.testing.assert_allclose(sums["loss_sum"], reference(jnp.asarray(logits)), rtol=1e-6)
  assert float(sums["correct_sum"]) == float(((logits.argmax(-1) == targets) * weights).sum())
  assert float(sums["correct_sum"]) >= 1
  ours = jax.grad(lambda l: token_losses(l, jnp.asarray(targets), jnp.asarray(weights))
                  ["loss_sum"])(jnp.asarray(logits))
  np.testing.assert_allclose(ours, jax.grad(reference)(jnp.asarray(logits)), atol=1e-6)


def test_attention_without_group_axis_matches_numpy():
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(2, 5, 3, 4)).astype(np.float32) for _ in range(3))
  bias = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
  segments = np.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 1]])
  mask = np.asarray(causal_segment_mask(jnp.asarray(segments)))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / 2.0 + bias
  logits = np.where(mask[:, None], logits, -1e30)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  expected = np.einsum("bnts,bsnh->btnh", probs / probs.sum(-1, keepdims=True), v)
  out = dot_product_attention(q, k, v, jnp.asarray(mask), bias)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  cache_layout = dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                       jnp.asarray(mask), bias, kv_layout="bksh")
  np.testing.assert_allclose(cache_layout, expected, atol=1e-5)


def test_blocked_attention_equals_attention_over_the_concatenation():
  """Cache block (B, K, S, H) + new-token block (B, T, K, H), grouped (N = 2K) and not."""
  rng = np.random.default_rng(2)
  for n, k in ((4, 2), (2, 2)):
    q = rng.normal(size=(2, 3, n, 4)).astype(np.float32)
    k_all, v_all = (rng.normal(size=(2, 7, k, 4)).astype(np.float32) for _ in range(2))
    mask = rng.random((2, 3, 7)) > 0.3
    mask[..., 0] = True
    bias = rng.normal(size=(1, n, 1, 7)).astype(np.float32)
    whole = dot_product_attention(q, k_all, v_all, jnp.asarray(mask), bias)
    cache = (k_all[:, :5].transpose(0, 2, 1, 3), v_all[:, :5].transpose(0, 2, 1, 3), "bksh")
    blocks = [cache, (k_all[:, 5:], v_all[:, 5:], "bskh")]
    np.testing.assert_allclose(blocked_attention(q, blocks, jnp.asarray(mask), bias), whole,
                               atol=1e-5)


def test_compilation_cache_dir_stores_executables(tmp_path):
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  before = jax.config.jax_compilation_cache_dir  # conftest's shared test cache
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:
    use_compilation_cache(str(tmp_path / "cache"))
    jax.jit(lambda x: x * 3.0 + 1.0)(jnp.arange(5.0)).block_until_ready()
    assert os.listdir(tmp_path / "cache")
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    jax.config.update("jax_compilation_cache_dir", before)
    compilation_cache.reset_cache()
