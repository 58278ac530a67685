"""Sampling filters and generation: properties that hold for any logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm.config import ConfigError
from llm.inference import (SamplingConfig, generate, generate_sequences, sample, top_k_filter,
                           top_p_filter)
from llm.inference.sampling import argmax, draw
from tests.helpers import LLAMA_TINY, GPT_TINY, model_and_params

LOGITS = jax.random.normal(jax.random.PRNGKey(0), (4, 50)) * 3


def _draws(cfg, n=400):
  keys = jax.random.split(jax.random.PRNGKey(1), n)
  return np.asarray(jax.vmap(lambda k: sample(k, LOGITS, cfg)[0])(keys))  # (n, B)


def _reference_distribution(logits, temperature, top_k=0, top_p=1.0):
  """What `sample` should draw from, in float64 NumPy: softmax(logits / temperature),
  its top_k most likely tokens, then the nucleus (mass before a token < top_p) of those
  renormalised, renormalised again."""
  z = np.asarray(logits, np.float64) / temperature
  probs = np.exp(z - z.max(-1, keepdims=True))
  out = np.zeros_like(probs)
  for row, p in enumerate(probs / probs.sum(-1, keepdims=True)):
    keep = np.argsort(-p, kind="stable")[:top_k or None]
    q = p[keep] / p[keep].sum()
    keep = keep[np.cumsum(q) - q < top_p]
    out[row, keep] = p[keep] / p[keep].sum()
  return out


@pytest.mark.parametrize("settings", [dict(temperature=1.5, top_k=5),
                                      dict(temperature=0.7, top_p=0.8),
                                      dict(temperature=1.0, top_k=12, top_p=0.9)])
def test_sampling_frequencies_match_the_renormalised_distribution(settings):
  """20,000 draws per row in one jitted call: a chi-square statistic (the rarest bins
  pooled to an expected count of 5) within its 1 - 1e-6 quantile, and nothing outside the
  support. Uniform sampling within top-k, a temperature applied after the filters or not
  at all fail."""
  from scipy import stats
  n = 20_000
  cfg = SamplingConfig(**settings)
  keys = jax.random.split(jax.random.PRNGKey(11), n)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: sample(k, LOGITS, cfg)[0]))(keys))
  want, degrees = _reference_distribution(LOGITS, **settings), 0
  for row in range(LOGITS.shape[0]):
    counts = np.bincount(draws[:, row], minlength=LOGITS.shape[1])
    assert not counts[want[row] == 0].any()
    order = np.argsort(want[row])[::-1][:(want[row] > 0).sum()][::-1]  # support, rarest first
    expected, observed = n * want[row][order], counts[order]
    pool = np.searchsorted(np.cumsum(expected), 5.0) + 1  # the rarest bins, pooled to >= 5
    expected = np.append(expected[pool:], expected[:pool].sum())
    observed = np.append(observed[pool:], observed[:pool].sum())
    chi2 = ((observed - expected) ** 2 / expected).sum()
    degrees += len(expected) - 1  # 0 for a one-token nucleus: the support check above
    assert chi2 <= stats.chi2.ppf(1 - 1e-6, max(len(expected) - 1, 1)), (row, chi2, expected)
  assert degrees >= 3  # the rows together do test frequencies


def test_argmax_is_numpys_first_index_of_the_max():
  """Ties go to the first index and a NaN wins (as np.argmax), in rows of random logits,
  ties, -inf and -1e30 (suppressed) values; last-index or NaN-blind versions fail."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((9, 37)).astype(np.float32)
  x[1, [3, 20]] = 9.0  # a tie
  x[2] = -np.inf
  x[2, [30, 31]] = 1.0
  x[3, 5], x[3, 7] = np.nan, 50.0
  x[4] = -1e30
  x[5, :] = 2.0  # all tied
  x[6, [0, 36]] = np.nan
  x[7, -1] = 100.0
  x[8, 0] = 100.0
  got = np.asarray(jax.jit(argmax)(jnp.asarray(x)))
  np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
  assert got.dtype == np.int32


def _sorted_reference_sets(x, k, p):
  """The kept sets by sorting each row in float64: the k largest (ties at the k-th kept),
  and the tokens whose strictly more likely tokens hold less than p of the mass."""
  kth = -np.sort(-x, axis=-1)[:, k - 1:k]
  probs = np.exp(x - x.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  above = np.array([[probs[r][x[r] > v].sum() for v in x[r]] for r in range(len(x))])
  assert np.abs(above - p).min() > 1e-5  # no token on the edge, where float32 may differ
  return x >= kth, above < p


def test_bisected_filters_keep_the_sorted_references_sets():
  """Rows with ties, negative and positive values and a suppressed (-1e30) logit: the
  bisected thresholds keep exactly the sets a sort keeps, for k from 1 to V - 1."""
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((6, 300)) * 2).astype(np.float32)
  x[:, 10:20] = x[:, :1]  # ties with the first value
  x[1] = np.round(x[1])  # many ties
  x[2, 5] = -1e30
  x[3] -= 50.0  # all negative
  filters = jax.jit(lambda x, k, p: (top_k_filter(x, k), top_p_filter(x, p)),
                    static_argnums=(1, 2))
  for k, p in [(1, 0.01), (2, 0.3), (7, 0.5), (50, 0.9), (299, 0.99)]:
    want_k, want_p = _sorted_reference_sets(x.astype(np.float64), k, p)
    got_k, got_p = (np.asarray(f) > -1e29 for f in filters(jnp.asarray(x), k, p))
    np.testing.assert_array_equal(got_k, want_k, err_msg=f"k={k}")
    np.testing.assert_array_equal(got_p, want_p, err_msg=f"p={p}")
    assert (got_k.sum(-1) >= k).all() and (got_p.sum(-1) >= 1).all()


def test_draw_follows_unnormalised_weights_and_never_picks_a_zero():
  """20,000 inverse-CDF draws per row: chi-square within its 1 - 1e-6 quantile, and
  tokens of weight 0 (first, middle, last) never drawn."""
  from scipy import stats
  w = np.array([[0.0, 1.0, 2.0, 0.0, 3.0, 0.5, 0.0],
                [5.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]], np.float32) * 7.0
  n = 20_000
  keys = jax.random.split(jax.random.PRNGKey(4), n)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: draw(k, jnp.asarray(w))))(keys))
  for row in range(2):
    counts = np.bincount(draws[:, row], minlength=w.shape[1])
    assert not counts[w[row] == 0].any()
    keep = w[row] > 0
    expected = n * w[row][keep] / w[row].sum()
    chi2 = ((counts[keep] - expected) ** 2 / expected).sum()
    assert chi2 <= stats.chi2.ppf(1 - 1e-6, keep.sum() - 1), (row, chi2)


def test_filters_keep_exactly_the_expected_sets():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.asarray(top_p_filter(logits, 0.7))[0] > -1e29
  np.testing.assert_array_equal(kept, [True, True, False, False])
  kept = np.asarray(top_k_filter(logits, 3))[0] > -1e29
  np.testing.assert_array_equal(kept, [True, True, True, False])


def test_temperature_zero_is_greedy_and_low_temperature_approaches_it():
  greedy, logp = sample(jax.random.PRNGKey(0), LOGITS, SamplingConfig(temperature=0))
  greedy = np.asarray(greedy)
  np.testing.assert_array_equal(greedy, np.argmax(np.asarray(LOGITS), -1))
  # The log-prob is the model's, unaffected by temperature: log_softmax at the token.
  np.testing.assert_allclose(logp, np.asarray(jax.nn.log_softmax(LOGITS))[np.arange(4), greedy],
                             rtol=1e-6)
  cold = _draws(SamplingConfig(temperature=1e-4), n=20)
  assert (cold == greedy[None]).all()


@pytest.mark.parametrize("bad, field", [(dict(max_new_tokens=0), "max_new_tokens"),
                                        (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                        (dict(top_k=-1), "top_k"),
                                        (dict(temperature=-0.1), "temperature")])
def test_bad_sampling_settings_name_the_field(bad, field):
  with pytest.raises(ConfigError, match=field):
    SamplingConfig(**bad)


def _greedy_reference(module, params, prompt, n):
  """Greedy decoding without a cache: the full sequence each step, at one fixed shape
  (causal, so the zeros after the last real token do not change its logits)."""
  seq = np.zeros((1, len(prompt) + n), np.int32)
  seq[0, :len(prompt)] = prompt
  for i in range(len(prompt), len(prompt) + n):
    seq[0, i] = int(np.argmax(module.apply({"params": params}, seq)[0, i - 1]))
  return seq[0, len(prompt):].tolist()


@pytest.mark.parametrize("config", [GPT_TINY, LLAMA_TINY])
def test_batched_prompts_of_different_lengths_match_one_at_a_time(config):
  module, params = model_and_params(**config)
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [3]]
  out = generate(module.module, params, prompts, SamplingConfig(temperature=0, max_new_tokens=6),
                 jax.random.PRNGKey(0))
  for prompt, got in zip(prompts, out):
    assert got == _greedy_reference(module, params, prompt, 6)


def test_same_seed_same_output_and_eos_stops_each_row():
  module, params = model_and_params(**LLAMA_TINY)
  prompts = [[5, 6, 7], [9, 10]]
  cfg = SamplingConfig(temperature=1.0, top_k=20, max_new_tokens=12)
  a = generate(module.module, params, prompts, cfg, jax.random.PRNGKey(3))
  b = generate(module.module, params, prompts, cfg, jax.random.PRNGKey(3))
  c = generate(module.module, params, prompts, cfg, jax.random.PRNGKey(4))
  assert a == b and a != c
  eos = a[0][2]  # pretend the third sampled token of row 0 is EOS
  stopped = generate(module.module, params, prompts, SamplingConfig(**{**cfg.__dict__,
                                                                       "eos_id": eos}),
                     jax.random.PRNGKey(3))
  assert stopped[0] == a[0][:a[0].index(eos) + 1]
  for row in stopped:
    assert eos not in row[:-1] and len(row) <= 12


def test_prompt_longer_than_context_window_is_rejected():
  module, params = model_and_params(**GPT_TINY)
  with pytest.raises(ConfigError, match="context window"):
    generate(module.module, params, [[1] * 30], SamplingConfig(max_new_tokens=8),
             jax.random.PRNGKey(0))


def test_suppressed_ids_are_never_emitted_greedy_or_sampled():
  banned = tuple(np.argsort(-np.asarray(LOGITS), axis=-1)[:, :3].ravel().tolist())
  draws = _draws(SamplingConfig(temperature=2.0, suppress_ids=banned), n=200)
  assert not set(draws.ravel()) & set(banned)
  greedy = np.asarray(sample(jax.random.PRNGKey(0), LOGITS,
                             SamplingConfig(temperature=0, suppress_ids=banned))[0])
  assert not set(greedy) & set(banned)


def test_sampled_log_probs_and_lengths_match_a_full_forward():
  module, params = model_and_params(**LLAMA_TINY)
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
  cfg = SamplingConfig(temperature=1.0, top_k=20, max_new_tokens=7)
  out = generate_sequences(module.module, params, prompts, cfg, jax.random.PRNGKey(5))
  assert out.tokens.shape == (2, 7) and out.lengths.tolist() == [7, 7]
  for row, prompt in enumerate(prompts):
    seq = np.array([prompt + out.tokens[row].tolist()])
    logp = np.asarray(jax.nn.log_softmax(module.apply({"params": params}, seq)[0]))
    expected = logp[np.arange(len(prompt) - 1, seq.shape[1] - 1), out.tokens[row]]
    np.testing.assert_allclose(out.logprobs[row], expected, atol=1e-4)
  eos = int(out.tokens[0, 3])  # pretend the fourth token of row 0 is EOS
  stopped = generate_sequences(module.module, params, prompts,
                               SamplingConfig(**{**cfg.__dict__, "eos_id": eos}),
                               jax.random.PRNGKey(5))
  first = out.tokens[0].tolist().index(eos)
  assert stopped.lengths[0] == first + 1
  np.testing.assert_array_equal(stopped.tokens[0, first + 1:], 0)
  np.testing.assert_allclose(stopped.logprobs[0, :first + 1], out.logprobs[0, :first + 1],
                             atol=1e-6)


@pytest.mark.parametrize("config, dtype", [(GPT_TINY, "bfloat16"), (LLAMA_TINY, "float16")])
def test_half_precision_batched_decode_matches_its_full_forward(config, dtype):
  """A half-precision cache at batch > 1 (a kv head per query head, and grouped heads):
  the cached steps' log-probs are the full forward's, to half precision."""
  module, params = model_and_params(**dict(config, dtype=dtype, param_dtype=dtype))
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
  out = generate_sequences(module.module, params, prompts,
                           SamplingConfig(temperature=0, max_new_tokens=5), jax.random.PRNGKey(0))
  for row, prompt in enumerate(prompts):
    seq = np.array([prompt + out.tokens[row].tolist()])
    logits = np.asarray(module.apply({"params": params}, seq)[0], np.float32)
    logp = np.asarray(jax.nn.log_softmax(logits))
    expected = logp[np.arange(len(prompt) - 1, seq.shape[1] - 1), out.tokens[row]]
    np.testing.assert_allclose(out.logprobs[row], expected, atol=0.05)


def test_encoders_do_not_generate():
  module, params = model_and_params(**GPT_TINY, family="encoder")
  with pytest.raises(ConfigError, match="encoder-only models"):
    generate(module.module, params, [[1, 2]], SamplingConfig(), jax.random.PRNGKey(0))
