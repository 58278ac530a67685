"""Reward model: a decoder with a scalar head read at the last real token, trained on
(chosen, rejected) pairs with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected),
fully or with LoRA (the head always trains). Afterwards a rater: it scores any
(prompt, completion) text framed as in training, [bos] prompt completion [eos].

Metrics: loss and accuracy (the share of pairs ranked as the labeler did) on train and
held-out pairs (`eval_accuracy`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm.align.heads import REWARD_HEAD, ScalarHead, last_token
from llm.align.pairs import SIDES, preference_rows, text_rows
from llm.config import ConfigError
from llm.data.preferences import preference_pairs
from llm.objectives import Objective, merge_params, register

def bradley_terry_loss(r_chosen: jax.Array, r_rejected: jax.Array) -> jax.Array:
  """-log sigmoid(r_chosen - r_rejected) per pair, computed stably."""
  return jax.nn.softplus(r_rejected - r_chosen)


def stacked_sides(batch) -> tuple[jax.Array, jax.Array]:
  """(tokens (2B, T), segment ids (2B, T)): chosen rows then rejected rows, one forward."""
  cat = lambda key: jnp.concatenate([batch[f"{s}_{key}"] for s in SIDES])
  return cat("inputs"), cat("segment_ids")


def rewards(module, params, tokens_BT, segment_ids_BT, rng=None) -> jax.Array:
  """(B,) the reward model's score of each right-padded row at its last real token."""
  rngs = None if rng is None else {"dropout": rng}
  scores_BT = module.apply({"params": params}, tokens_BT, None, segment_ids_BT,
                           deterministic=rng is None, rngs=rngs)
  return last_token(scores_BT, segment_ids_BT)


@dataclasses.dataclass(frozen=True)
class RewardObjective(Objective):
  def rows(self, cfg, tokenizer, split: str):
    return preference_rows(cfg, tokenizer, split)

  def example_batch(self, cfg, batch_size: int = 1):
    return {"inputs": np.zeros((batch_size, cfg.data.seq_len), np.int32)}

  def build(self, cfg):
    return ScalarHead(cfg.model, REWARD_HEAD)

  def trainable(self, cfg) -> str:
    return f"{super().trainable(cfg)}|^{REWARD_HEAD}/"

  def loss(self, module, trainable, frozen, batch, rng):
    tokens, segments = stacked_sides(batch)
    r = rewards(module, merge_params(trainable, frozen), tokens, segments, rng)
    r_chosen, r_rejected = jnp.split(r, 2)
    real = (batch["chosen_segment_ids"][:, 0] > 0).astype(jnp.float32)  # eval padding rows
    return {"loss_sum": jnp.sum(bradley_terry_loss(r_chosen, r_rejected) * real),
            "weight_sum": jnp.sum(real),
            "correct_sum": jnp.sum((r_chosen > r_rejected) * real),
            "margin_sum": jnp.sum((r_chosen - r_rejected) * real)}, {}


register(RewardObjective("reward", ("decoder",)))


# --- the trained reward model as a rater --------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rater:
  module: object
  params: dict
  tokenizer: object
  seq_len: int
  preferences: str  # the preference data it learnt from (align.preferences)

  @classmethod
  def load(cls, workdir: str) -> "Rater":
    from llm.train import load
    cfg, params, tokenizer = load(workdir)
    if cfg.data.objective != "reward":
      raise ConfigError(f"--rater {workdir}: trained with objective {cfg.data.objective!r}, "
                        "not a reward model; pass an experiments.reward_model workdir")
    return cls(ScalarHead(cfg.model, REWARD_HEAD), params, tokenizer, cfg.data.seq_len,
               cfg.align.preferences)

  def check_tokenizer(self, tokenizer, who: str = "the policy") -> None:
    if tokenizer.model_proto != self.tokenizer.model_proto:
      raise ConfigError(f"the reward model's tokenizer differs from {who}'s; train the reward "
                        "model from the same base (config.train.init_from) as the policy")

  def score_tokens(self, tokens_BT, segment_ids_BT) -> jax.Array:
    return _rewards_jit(self.module, self.params, tokens_BT, segment_ids_BT)

  def score(self, prompts: Sequence[str], completions: Sequence[str],
            batch_size: int = 64) -> np.ndarray:
    """(N,) rewards of (prompt, completion) texts."""
    rows = text_rows(prompts, completions, self.tokenizer, self.seq_len)
    n = len(prompts)
    padded = {k: np.pad(v, ((0, -n % batch_size), (0, 0))) for k, v in rows.items()}
    out = [np.asarray(self.score_tokens(padded["inputs"][i:i + batch_size],
                                        padded["segment_ids"][i:i + batch_size]))
           for i in range(0, len(padded["inputs"]), batch_size)]
    return np.concatenate(out)[:n]


@functools.partial(jax.jit, static_argnames=("module",))
def _rewards_jit(module, params, tokens_BT, segment_ids_BT):
  return rewards(module, params, tokens_BT, segment_ids_BT)


def held_out_report(rater: Rater, preferences: str, seed: int = 0) -> dict:
  """Accuracy on every validation pair; for the generated task, also the share of pairs
  with different true scores that the model orders as the hidden rule does."""
  from llm.data.preferences import true_score
  pairs = preference_pairs(preferences, "validation", seed)
  prompts = [p.prompt for p in pairs]
  chosen = rater.score(prompts, [p.chosen for p in pairs])
  rejected = rater.score(prompts, [p.rejected for p in pairs])
  out = {"held_out_pairs": len(pairs), "held_out_accuracy": float(np.mean(chosen > rejected))}
  if preferences == "review":
    truth = np.array([true_score(p.chosen) - true_score(p.rejected) for p in pairs])
    decided = truth != 0
    out["true_order_accuracy"] = float(np.mean(((chosen - rejected) * truth > 0)[decided]))
  return out
