"""PPO (Schulman et al. 2017) for language models with a KL penalty to a frozen reference
(Ziegler et al. 2019; InstructGPT): the math as pure functions, and the "ppo" objective
whose loss is one minibatch update of policy and value head.

A rollout row is [bos] prompt response, laid out as a causal-LM row (inputs / targets
shifted by one); `weights` mark the targets that are response tokens. The reward of
response token t is -kl_coef * (log pi(y_t) - log ref(y_t)) (an unbiased estimate of
the per-token KL(pi || ref)), plus the reward model's score on the last one.
The loop (rollouts, advantages, epochs of minibatches) is `llm.align.rollout`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llm.align.heads import VALUE_HEAD, ScalarHead
from llm.eval.likelihood import token_log_probs
from llm.objectives import Objective, merge_params, register


def kl_estimate(logp_BT: jax.Array, ref_logp_BT: jax.Array) -> jax.Array:
  """log pi(y) - log ref(y) at sampled tokens: its mean under pi is KL(pi || ref)."""
  return logp_BT - ref_logp_BT


def exact_kl(logits_BTV: jax.Array, ref_logits_BTV: jax.Array) -> jax.Array:
  """KL(pi(.|s_t) || ref(.|s_t)) over the whole vocabulary, per position."""
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  ref = jax.nn.log_softmax(ref_logits_BTV.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.exp(logp) * (logp - ref), axis=-1)


def entropy(logits_BTV: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def token_rewards(score_B, kl_BT, mask_BT, kl_coef: float) -> jax.Array:
  """-kl_coef * KL per response token, plus the sequence's score on its last token."""
  last_BT = mask_BT * (jnp.cumsum(mask_BT[:, ::-1], axis=1)[:, ::-1] == 1)
  return (-kl_coef * kl_BT + score_B[:, None] * last_BT) * mask_BT


def gae(rewards_BT, values_BT, mask_BT, gamma: float, lam: float):
  """(advantages, returns), generalized advantage estimation over each row's masked
  (response) positions: A_t = delta_t + gamma * lam * A_{t+1}, with
  delta_t = r_t + gamma * V_{t+1} - V_t and V = 0 after the response ends."""
  values_BT = values_BT * mask_BT
  next_values_BT = jnp.concatenate([values_BT[:, 1:], jnp.zeros_like(values_BT[:, :1])], 1)
  deltas_BT = rewards_BT + gamma * next_values_BT - values_BT

  def step(carry_B, delta_mask):
    delta_B, mask_B = delta_mask
    advantage_B = (delta_B + gamma * lam * carry_B) * mask_B
    return advantage_B, advantage_B
  _, advantages_TB = jax.lax.scan(step, jnp.zeros_like(deltas_BT[:, 0]),
                                  (deltas_BT.T[::-1], mask_BT.T[::-1]))
  advantages_BT = advantages_TB[::-1].T
  return advantages_BT, (advantages_BT + values_BT) * mask_BT


def whiten(x_BT, mask_BT, eps: float = 1e-8):
  """Zero mean, unit variance over the masked entries (the advantage normalisation)."""
  n = jnp.maximum(mask_BT.sum(), 1.0)
  mean = jnp.sum(x_BT * mask_BT) / n
  var = jnp.sum(jnp.square(x_BT - mean) * mask_BT) / n
  return (x_BT - mean) * jax.lax.rsqrt(var + eps) * mask_BT


def clipped_surrogate(logp_BT, old_logp_BT, advantages_BT, clip_eps: float):
  """(per-token loss, clipped?): max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = pi / pi_old."""
  ratio = jnp.exp(logp_BT - old_logp_BT)
  unclipped = -advantages_BT * ratio
  clipped = -advantages_BT * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32)


def value_loss(values_BT, old_values_BT, returns_BT, clip: float):
  """0.5 max((V - R)^2, (V_clipped - R)^2), V clipped to old V +- clip."""
  clipped = old_values_BT + jnp.clip(values_BT - old_values_BT, -clip, clip)
  return 0.5 * jnp.maximum(jnp.square(values_BT - returns_BT), jnp.square(clipped - returns_BT))


def adaptive_kl_coef(coef: float, kl: float, target: float, num_samples: int,
                     horizon: int) -> float:
  """Ziegler et al.'s proportional controller: the coefficient grows while the KL per
  response is above `target` and shrinks below, by at most 20% per horizon."""
  error = min(max(kl / target - 1.0, -0.2), 0.2)
  return coef * (1.0 + error * num_samples / horizon)


@dataclasses.dataclass(frozen=True)
class ProximalPolicy(Objective):
  clip_eps: float = 0.2
  value_clip: float = 0.2
  value_coef: float = 0.5
  entropy_coef: float = 0.0

  def configured(self, cfg):
    a = cfg.align
    return dataclasses.replace(self, clip_eps=a.clip_eps, value_clip=a.value_clip,
                               value_coef=a.value_coef, entropy_coef=a.entropy_coef)

  def rows(self, cfg, tokenizer, split):
    raise NotImplementedError("PPO rows are rollouts; run llm.align.rollout.train_ppo")

  def build(self, cfg):
    return ScalarHead(cfg.model, VALUE_HEAD)

  def trainable(self, cfg) -> str:
    return f"{super().trainable(cfg)}|^{VALUE_HEAD}/"

  def loss(self, module, trainable, frozen, batch, rng):
    params = merge_params(trainable, frozen)
    rngs = None if rng is None else {"dropout": rng}
    logits, values = module.apply({"params": params}, batch["inputs"], batch["positions"],
                                  batch["segment_ids"], deterministic=rng is None, rngs=rngs,
                                  with_logits=True)
    logp = token_log_probs(logits, batch["targets"])
    mask = batch["weights"]
    policy, clipped = clipped_surrogate(logp, batch["old_logprobs"], batch["advantages"],
                                        self.clip_eps)
    values_loss = value_loss(values, batch["old_values"], batch["returns"], self.value_clip)
    ent = entropy(logits)
    per_token = policy + self.value_coef * values_loss - self.entropy_coef * ent
    log_ratio = logp - batch["old_logprobs"]
    total = lambda x: jnp.sum(x * mask)
    return {"loss_sum": total(per_token), "weight_sum": jnp.sum(mask),
            "policy_loss_sum": total(policy), "value_loss_sum": total(values_loss),
            "entropy_sum": total(ent), "clip_fraction_sum": total(clipped),
            "approx_kl_sum": total(jnp.exp(log_ratio) - 1 - log_ratio)}, {}


register(ProximalPolicy("ppo", ("decoder",)))
