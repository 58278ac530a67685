"""Alignment math against hand computations and NumPy references; the losses at their
known starting values on a tiny model; one short PPO run."""

import flax.linen as nn
import jax.numpy as jnp
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


# --- PPO math ----------------------------------------------------------------------

def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_the_sampled_kl_estimate_is_the_exact_kl_on_a_tiny_vocabulary():
  from llm.align import ppo
  rng = np.random.default_rng(0)
  logits, ref_logits = rng.normal(size=(3, 5)) * 2, rng.normal(size=(3, 5))
  logp, ref = _log_softmax(logits), _log_softmax(ref_logits)
  exact = np.asarray(ppo.exact_kl(logits[None], ref_logits[None]))[0]
  np.testing.assert_allclose(exact, (np.exp(logp) * (logp - ref)).sum(-1), rtol=1e-5)
  # Its expectation over the policy's tokens is the KL ...
  every_token = np.asarray(ppo.kl_estimate(logp, ref))
  np.testing.assert_allclose((np.exp(logp) * every_token).sum(-1), exact, rtol=1e-5)
  # ... and its sample mean converges to it.
  draws = np.stack([rng.choice(5, 200_000, p=np.exp(row)) for row in logp])
  estimates = np.asarray(ppo.kl_estimate(np.take_along_axis(logp, draws, 1),
                                         np.take_along_axis(ref, draws, 1)))
  np.testing.assert_allclose(estimates.mean(1), exact,
                             atol=4 * estimates.std(1).max() / np.sqrt(200_000))


def _gae_reference(rewards, values, mask, gamma, lam):
  advantages = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    steps = np.flatnonzero(mask[b])
    following = 0.0
    for i, t in enumerate(steps[::-1]):
      next_value = values[b, t + 1] if i > 0 else 0.0
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      following = delta + gamma * lam * following
      advantages[b, t] = following
  return advantages, (advantages + values) * mask


def test_gae_and_the_clipped_objective_against_numpy_on_fixed_numbers():
  import jax
  from llm.align import ppo
  gae = jax.jit(ppo.gae, static_argnums=(3, 4))  # one compile each, not one per eager op
  rng = np.random.default_rng(1)
  mask = np.zeros((3, 7), np.float32)
  mask[0, 2:6], mask[1, 1:7], mask[2, 4:5] = 1, 1, 1  # responses after prompts of any length
  rewards, values = (rng.normal(size=(3, 7)).astype(np.float32) * mask,
                     rng.normal(size=(3, 7)).astype(np.float32))
  for gamma, lam in ((1.0, 0.95), (0.9, 0.5)):
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_reference(rewards, values * mask, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-6)
  # Rewards: -beta * KL on every response token, the score on the last one.
  kl = rng.normal(size=(3, 7)).astype(np.float32) * mask
  got = np.asarray(ppo.token_rewards(np.array([1.0, 2.0, 3.0]), kl, mask, 0.1))
  want = -0.1 * kl
  want[0, 5] += 1.0
  want[1, 6] += 2.0
  want[2, 4] += 3.0
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Clipped surrogate: max(-A r, -A clip(r)), fixed numbers.
  logp = np.log(np.array([0.5, 0.5, 0.5, 0.5, 0.2]))
  old = np.log(np.array([0.25, 0.25, 0.5, 0.8, 0.2]))  # ratios 2, 2, 1, 0.625, 1
  adv = np.array([1.0, -1.0, 3.0, -2.0, 0.0])
  loss, clipped = ppo.clipped_surrogate(logp, old, adv, 0.2)
  np.testing.assert_allclose(loss, [-1.2, 2.0, -3.0, 1.6, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [1, 0, 0, 1, 0])
  v, old_v, ret = np.array([1.0, 0.0]), np.array([0.0, 0.0]), np.array([0.0, 1.0])
  np.testing.assert_allclose(ppo.value_loss(v, old_v, ret, 0.2),
                             [0.5 * max(1.0, 0.04), 0.5 * max(1.0, 1.0)], rtol=1e-6)
  white = np.asarray(ppo.whiten(rewards + 3.0, mask))
  assert abs(white[mask > 0].mean()) < 1e-5 and abs(white[mask > 0].std() - 1) < 1e-4
  assert np.all(white[mask == 0] == 0)


def test_the_adaptive_kl_controller_by_hand_and_a_negative_coefficient_is_refused():
  from llm import config as config_lib
  from llm.align import ppo
  assert ppo.adaptive_kl_coef(0.1, 8.0, 4.0, 64, 10000) == pytest.approx(0.1 * (1 + 0.2 * 64e-4))
  assert ppo.adaptive_kl_coef(0.1, 3.6, 4.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
  assert ppo.adaptive_kl_coef(0.1, 1.0, 4.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
  with pytest.raises(ConfigError, match=r"config.align.kl_coef=-0.1: must be >= 0"):
    config_lib.from_configdict({"align": {"kl_coef": -0.1}})


def test_dpo_loss_by_hand():
  from llm.align import dpo
  loss, margin = dpo.dpo_loss(np.array([-3.0, -5.0]), np.array([-4.0, -5.0]),
                              np.array([-3.5, -5.0]), np.array([-3.5, -5.0]), 0.5)
  np.testing.assert_allclose(margin, [0.5 * (0.5 - -0.5), 0.0])
  np.testing.assert_allclose(loss, [np.log1p(np.exp(-0.5)), np.log(2)], rtol=1e-6)


# --- on a tiny model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tokenizer of the review task's text, a tiny decoder config and random params."""
  from llm.data import preferences
  from llm.data.tokenizer import train_tokenizer
  from tests.helpers import GPT_TINY
  records = preferences.review_rankings("train")[:200]
  texts = [r["prompt"] + c for r in records for c in r["completions"]]
  tokenizer = train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok") / "t.model", 0)
  model = dict(GPT_TINY, vocab_size=300, max_len=48)
  return tokenizer, model


def _cfg(model, **sections):
  from llm import config as config_lib
  base = {"model": model, "data": {"seq_len": 32, "batch_size": 8},
          "train": {"warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": 0.0},
          "align": {"rollout_batch": 16, "response_len": 6, "ppo_epochs": 2,
                    "ppo_minibatches": 2},
          "parallel": {"data": 1}}
  for name, values in sections.items():
    base[name] = {**base[name], **values}
  return config_lib.from_configdict(base)


def test_dpo_loss_at_the_start_is_log_2(tiny):
  import jax
  from llm.align import dpo
  from llm.data.preferences import preference_pairs
  from llm.models import build
  from tests.helpers import random_params
  tokenizer, model = tiny
  cfg = _cfg(model, data={"objective": "dpo"})
  module = build(cfg.model)
  params = random_params(module, np.ones((1, 8), np.int32), std=0.3)
  rows = dpo.completion_rows(preference_pairs("review", "validation")[:8], tokenizer, 32)
  refs = {f"ref_{s}": dpo.sequence_log_probs(module, params, {
      k: rows[f"{s}_{k}"] for k in ("inputs", "targets", "weights", "segment_ids", "positions")})
      for s in ("chosen", "rejected")}
  objective = dpo.DirectPreference("dpo", ("decoder",)).configured(cfg)
  sums, _ = jax.jit(lambda p, b: objective.loss(module, p, {}, b, None))(params,
                                                                          {**rows, **refs})
  assert float(sums["weight_sum"]) == 8
  assert float(sums["loss_sum"]) / 8 == pytest.approx(np.log(2), abs=1e-5)
  assert float(sums["chosen_reward_sum"]) == pytest.approx(0, abs=1e-4)


class EvenCount(nn.Module):
  """A reward model by hand: the count of even token ids in the sequence so far, so the
  score of a response is known and PPO's progress on it unambiguous."""

  @nn.compact
  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, deterministic=True):
    return jnp.cumsum((tokens_BT % 2 == 0) & (segment_ids_BT > 0), axis=1).astype(jnp.float32)


@pytest.fixture(scope="module")
def ppo_runs(tiny):
  """Rollouts of a random policy against `EvenCount`, through one compiled step: first
  with a zero learning rate (a state at the end of its cosine schedule, which decays to
  0), then a short run that learns."""
  import dataclasses
  import jax
  import optax
  from llm import parallel
  from llm.align import rollout
  from llm.align.heads import VALUE_HEAD, ScalarHead
  from llm.config import ModelConfig
  from llm.train.optimizer import schedule
  from tests.helpers import random_params
  tokenizer, model = tiny
  model = dict(model, num_layers=1, scan_layers=False)  # compiles fastest
  policy = random_params(ScalarHead(ModelConfig(**model), VALUE_HEAD), np.ones((1, 8), np.int32),
                         std=0.1)
  rater = reward.Rater(EvenCount(), {}, tokenizer, 32, "review")
  mesh = parallel.make_mesh(parallel.ParallelConfig(data=1), jax.devices()[:1])
  cfg = _cfg(model, data={"objective": "ppo"},
             train={"steps": 24, "learning_rate": 1e-2, "min_lr_ratio": 0.0},
             align={"rollout_batch": 32, "ppo_epochs": 4, "kl_coef": 0.0})
  setup, state = rollout.setup(cfg, policy, tokenizer, rater, mesh)
  start = jax.tree_util.tree_map(jnp.copy, state)
  ended = start.replace(opt_state=optax.tree_utils.tree_set(start.opt_state, count=10 ** 6))
  updates = cfg.train.steps * cfg.align.ppo_epochs * cfg.align.ppo_minibatches
  assert float(schedule(dataclasses.replace(cfg.train, steps=updates))(10 ** 6)) == 0.0

  def run(state, iterations):
    rng, records = np.random.default_rng(0), []
    for step in range(1, iterations + 1):
      state, record = rollout.ppo_iteration(setup, state, cfg.align.kl_coef, step, rng)
      records.append(record)
    return jax.device_get(state.params), records
  return (setup, *run(ended, 2)), (setup, *run(state, 12))


def test_with_a_zero_learning_rate_the_policy_stays_the_reference(ppo_runs):
  import jax
  (setup, params, records), _ = ppo_runs
  same = jax.tree_util.tree_map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                params, jax.device_get(setup.ref_copy))
  assert all(jax.tree_util.tree_leaves(same))  # bitwise
  for record in records:  # the same function twice: equal up to float rounding
    assert abs(record["kl"]) < 1e-5 and abs(record["exact_kl"]) < 1e-5
    assert record["train_clip_fraction"] == 0.0 and record["train_approx_kl"] == 0.0


def test_a_short_ppo_run_raises_the_reward_model_score(ppo_runs):
  _, (_, _, records) = ppo_runs
  rewards = [r["reward"] for r in records]  # even tokens per row; 6 are sampled
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 1.0, rewards
  assert records[-1]["kl"] > 0.01  # it moved away from the reference to get there
  for key in ("entropy", "train_value_loss", "train_clip_fraction", "true_score",
              "ref_perplexity"):
    assert np.isfinite(records[-1][key])
