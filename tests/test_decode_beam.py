"""Beam search: width 1 is greedy, wider beams score at least as well, and a beam as wide
as every prefix finds the exhaustive-search optimum (with a length penalty and EOS)."""

import itertools

import jax
import numpy as np
import pytest

from llm.config import ConfigError
from llm.inference import SamplingConfig, beam_search, generate_sequences
from llm.inference.beam import length_normalizer
from tests.helpers import LLAMA_TINY, model_and_params, peaky, t5_tiny_and_params


@pytest.mark.parametrize("family", ["decoder", "seq2seq"])
def test_width_one_is_greedy_and_wider_beams_score_higher(family):
  if family == "decoder":
    module, params = model_and_params(**LLAMA_TINY)
    module, params = module.module, peaky(params)
  else:
    module, params = t5_tiny_and_params()
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
  sampling = SamplingConfig(temperature=0, max_new_tokens=6)
  greedy = generate_sequences(module, params, prompts, sampling, jax.random.PRNGKey(0))
  one = beam_search(module, params, prompts, sampling, beams=1)
  np.testing.assert_array_equal(one.tokens[:, 0], greedy.tokens)
  np.testing.assert_allclose(one.logprobs[:, 0], greedy.logprobs, atol=1e-5)
  four = beam_search(module, params, prompts, sampling, beams=4)
  assert four.tokens.shape == (2, 4, 6)
  best = four.logprobs[:, 0].sum(-1)
  assert (best >= greedy.logprobs.sum(-1) - 1e-5).all()
  assert (np.diff(four.scores, axis=1) <= 1e-6).all()  # sorted, best first
  np.testing.assert_allclose(four.scores, four.logprobs.sum(-1), rtol=1e-5)  # penalty 0


def test_full_width_beam_ranks_like_exhaustive_search_with_eos_and_length_penalty():
  vocab, n, eos, alpha, top = 5, 3, 0, 0.8, 12
  module, params = model_and_params(**{**LLAMA_TINY, "vocab_size": vocab})
  params = jax.tree_util.tree_map(lambda x: x * 3 if x.ndim > 1 else x, params)
  prompt = [1, 3]
  # As wide as all prefixes of length n - 1: nothing is pruned before the last step.
  out = beam_search(module.module, params, [prompt], SamplingConfig(max_new_tokens=n,
                                                                    eos_id=eos),
                    beams=vocab ** (n - 1), length_penalty=alpha)
  seqs = np.array([prompt + list(s) for s in itertools.product(range(vocab), repeat=n)])
  logp = np.asarray(jax.nn.log_softmax(module.apply({"params": params}, seqs), -1))
  scores = {}
  for row, seq in enumerate(seqs[:, len(prompt):].tolist()):
    length = seq.index(eos) + 1 if eos in seq else n
    total = sum(logp[row, len(prompt) - 1 + t, seq[t]] for t in range(length))
    scores[tuple(seq[:length])] = total / length_normalizer(length, alpha)
  ranked = sorted(scores, key=scores.get, reverse=True)[:top]
  assert {len(s) for s in ranked} == {1, 2, 3}  # beams of every length compete
  got = [out.tokens[0, w, :out.lengths[0, w]].tolist() for w in range(top)]
  assert got == [list(s) for s in ranked]
  np.testing.assert_allclose(out.scores[0, :top], [scores[s] for s in ranked], rtol=1e-5)


def test_beams_below_one_are_refused():
  module, params = model_and_params(**LLAMA_TINY)
  with pytest.raises(ConfigError, match="beams=0: must be >= 1"):
    beam_search(module.module, params, [[1, 2]], SamplingConfig(), beams=0)
