"""Alignment math against hand computations and NumPy references; the losses at their
known starting values on a tiny model; one short PPO run."""

import numpy as np
import pytest

from llm.align import reward
from llm.config import ConfigError


def test_bradley_terry_loss_by_hand():
  r_chosen, r_rejected = np.array([2.0, -1.0, 0.0]), np.array([0.5, 1.0, 0.0])
  # -log sigmoid(d) = log(1 + exp(-d)) for d = 1.5, -2, 0.
  expected = [np.log1p(np.exp(-1.5)), np.log1p(np.exp(2.0)), np.log(2.0)]
  np.testing.assert_allclose(reward.bradley_terry_loss(r_chosen, r_rejected), expected,
                             rtol=1e-6)
  # Stable far from zero, where a naive log(sigmoid) underflows.
  np.testing.assert_allclose(reward.bradley_terry_loss(np.float32(-100.0), np.float32(0.0)),
                             100.0, rtol=1e-6)


class _Tok:
  def __init__(self, proto):
    self.model_proto = proto


def test_a_rater_refuses_a_policy_with_another_tokenizer():
  rater = reward.Rater(None, {}, _Tok(b"a"), 8, "review")
  rater.check_tokenizer(_Tok(b"a"))
  with pytest.raises(ConfigError, match="reward model's tokenizer differs from the policy's"):
    rater.check_tokenizer(_Tok(b"b"))
