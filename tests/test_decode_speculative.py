"""Speculative decoding: greedy equals the target's greedy output token for token, and
sampled sequences follow the target's distribution (total variation on a tiny vocab)."""

import itertools

import jax
import numpy as np
import pytest

from llm import config as config_lib
from llm.config import ConfigError
from llm.inference import SamplingConfig, generate_sequences
from llm.inference.decode import few_row_layout, for_decoding, untied_head
from llm.inference.quantize import quantize_params
from llm.inference.speculative import speculative_generate
from llm.models import build
from tests.helpers import GPT_TINY, LLAMA_TINY, model_and_params


def _model(scale=4.0, **overrides):
  module, params = model_and_params(**{**LLAMA_TINY, **overrides})
  # Larger weights than the init, so that next-token distributions are far from uniform.
  return module, jax.tree_util.tree_map(lambda x: x * scale if x.ndim > 1 else x, params)


def test_greedy_is_the_targets_greedy_output_with_any_draft():
  target, params = _model()
  draft, draft_params = _model(num_layers=1, seed=1)
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [3]]
  sampling = SamplingConfig(temperature=0, max_new_tokens=10)
  want = generate_sequences(target.module, params, prompts, sampling, jax.random.PRNGKey(0))
  for module, p in [(draft.module, draft_params), (target.module, params)]:
    got, stats = speculative_generate(target.module, params, module, p, prompts, sampling,
                                      jax.random.PRNGKey(0), gamma=3)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    if module is target.module:
      assert stats["acceptance_rate"] == 1.0  # a draft that is the target is always right
    else:
      assert stats["acceptance_rate"] < 1.0


def test_untied_head_is_the_same_function_and_a_tied_target_still_matches_greedy():
  """Speculation's CPU loop reads a tied table as an untied E^T kernel (XLA's own dots
  would transpose it at every step): the same logits, the same greedy tokens."""
  target, params = model_and_params(**GPT_TINY)
  module, dec_params = for_decoding(target.module, params)
  untied, untied_params = untied_head(module, dec_params)
  assert target.cfg.tie_embeddings and not untied.cfg.tie_embeddings
  tokens = np.random.default_rng(0).integers(1, 64, (2, 8))
  np.testing.assert_allclose(untied.apply({"params": untied_params}, tokens),
                             target.apply({"params": params}, tokens), atol=1e-5)
  assert untied_head(untied, untied_params)[0] is untied  # idempotent
  quantized = quantize_params(dec_params, "int8")
  assert untied_head(module, quantized)[1] is quantized  # int8 tables stay tied
  # ... and quantized params keep XLA's default dots (its own int8 dots are the slow ones).
  assert few_row_layout(module, quantized, rows=5) == (module, quantized, ())
  draft, draft_params = model_and_params(seed=1, **dict(GPT_TINY, num_layers=1))
  prompts = [[5, 6, 7], [9, 10, 11, 12]]
  sampling = SamplingConfig(temperature=0, max_new_tokens=8)
  want = generate_sequences(target.module, params, prompts, sampling, jax.random.PRNGKey(0))
  got, _ = speculative_generate(target.module, params, draft.module, draft_params, prompts,
                                sampling, jax.random.PRNGKey(0), gamma=3)
  np.testing.assert_array_equal(got.tokens, want.tokens)


def _sequence_probs(apply, params, prompt, vocab, n):
  """Exact probability of every n-token continuation under temperature-1 sampling."""
  seqs = np.array([prompt + list(s) for s in itertools.product(range(vocab), repeat=n)])
  logp = np.asarray(jax.nn.log_softmax(apply.apply({"params": params}, seqs), -1))
  steps = np.arange(len(prompt) - 1, len(prompt) - 1 + n)
  return np.exp(logp[:, steps][np.arange(len(seqs))[:, None], np.arange(n),
                               seqs[:, len(prompt):]].sum(-1))


def test_sampled_sequences_follow_the_targets_distribution():
  vocab, n, rows, prompt = 4, 3, 20000, [1, 2]
  target, params = _model(scale=5.0, vocab_size=vocab)
  draft, draft_params = _model(scale=5.0, vocab_size=vocab, num_layers=1, seed=5)
  p = _sequence_probs(target, params, prompt, vocab, n)
  q = _sequence_probs(draft, draft_params, prompt, vocab, n)
  out, stats = speculative_generate(target.module, params, draft.module, draft_params,
                                    [prompt] * rows, SamplingConfig(max_new_tokens=n),
                                    jax.random.PRNGKey(7), gamma=2)
  assert 0.1 < stats["acceptance_rate"] < 0.9  # rows keep different numbers of tokens
  index = (out.tokens * vocab ** np.arange(n)[::-1]).sum(-1)
  empirical = np.bincount(index, minlength=vocab ** n) / rows
  # Sampling noise alone gives TV ~0.02 at 20000 rows (plain sampling measured 0.019);
  # the draft's own distribution is 0.36 away, so a sampler leaning towards it fails.
  assert 0.5 * np.abs(empirical - p).sum() < 0.04
  assert 0.5 * np.abs(q - p).sum() > 0.3
  chi2 = rows * ((empirical - p) ** 2 / p).sum()
  assert chi2 < 110, chi2  # 63 degrees of freedom: mean 63, sd 11


def test_mismatched_draft_and_bad_gamma_are_refused():
  # Refused before any params are read.
  target = build(config_lib.model_from_dict(LLAMA_TINY))
  draft = build(config_lib.model_from_dict({**LLAMA_TINY, "vocab_size": 32}))
  args = ([[1, 2]], SamplingConfig(), jax.random.PRNGKey(0))
  with pytest.raises(ConfigError, match="vocab_size=32.*train the draft with the target's"):
    speculative_generate(target, None, draft, None, *args)
  with pytest.raises(ConfigError, match="gamma=0: must be >= 1"):
    speculative_generate(target, None, target, None, *args, gamma=0)
