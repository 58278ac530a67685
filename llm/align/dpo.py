"""DPO (Rafailov et al. 2023): the policy itself as the reward model,
loss = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])
over (chosen y_w, rejected y_l) completions, with log-probs summed over each completion.

The reference is the model training starts from (`train.init_from`) and never changes,
so its log-probs are computed once with the rows rather than in every step: the same
loss, without a second model in the step (under LoRA the reference would be the base
weights with the adapter off; either way it is this fixed function). At the start the
policy equals the reference and the loss is log 2.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from llm.align.pairs import SIDES, preference_split
from llm.config import ConfigError
from llm.data.preferences import preference_pairs
from llm.data.sft import sft_rows
from llm.eval.likelihood import log_likelihood, token_log_probs
from llm.models import apply_batch, build
from llm.objectives import Objective, merge_params, register

_ROW_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
  """(per-pair loss, margin) from summed completion log-probs; margin > 0 = the policy
  prefers the chosen completion more than the reference does."""
  margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
  return jax.nn.softplus(-margin), margin


def completion_rows(pairs, tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """chosen_* / rejected_* rows as supervised fine-tuning frames them (weights on the
  completion and its eos)."""
  rows = {}
  for side in SIDES:
    side_rows, _ = sft_rows([(p.prompt, getattr(p, side)) for p in pairs], tokenizer, seq_len,
                            "decoder")
    rows.update({f"{side}_{k}": side_rows[k] for k in _ROW_KEYS})
  return rows


def sequence_log_probs(module, params, rows: dict, batch_size: int = 64) -> np.ndarray:
  """(N,) summed log-prob of each row's weighted targets."""
  n = len(rows["inputs"])
  padded = {k: np.pad(v, ((0, -n % batch_size), (0, 0))) for k, v in rows.items()}
  sums = []
  for start in range(0, len(padded["inputs"]), batch_size):
    batch = {k: v[start:start + batch_size] for k, v in padded.items()}
    sums.append((np.asarray(log_likelihood(module, params, batch)) * batch["weights"]).sum(1))
  return np.concatenate(sums)[:n]


def reference_log_probs(cfg, rows: dict) -> dict[str, np.ndarray]:
  """ref_chosen / ref_rejected of every row under the train.init_from model."""
  from llm.train import init_from  # training imports the objectives
  if not cfg.train.init_from:
    raise ConfigError("config.train.init_from is empty: DPO needs the model it starts from "
                      "(the reference), e.g. a fine-tuned workdir")
  model_cfg, params, _ = init_from.pretrained(cfg.train.init_from)
  module = build(model_cfg)
  return {f"ref_{side}": sequence_log_probs(
      module, params, {k: rows[f"{side}_{k}"] for k in _ROW_KEYS}).astype(np.float32)
          for side in SIDES}


@dataclasses.dataclass(frozen=True)
class DirectPreference(Objective):
  beta: float = 0.1

  def configured(self, cfg):
    return dataclasses.replace(self, beta=cfg.align.dpo_beta)

  def rows(self, cfg, tokenizer, split: str):
    pairs = preference_pairs(cfg.align.preferences, preference_split(cfg, split),
                             cfg.data.shuffle_seed)
    rows = completion_rows(pairs, tokenizer, cfg.data.seq_len)
    return {**rows, **reference_log_probs(cfg, rows)}

  def loss(self, module, trainable, frozen, batch, rng):
    params = merge_params(trainable, frozen)
    both = {k: jnp.concatenate([batch[f"{s}_{k}"] for s in SIDES]) for k in _ROW_KEYS}
    logits_BTV, aux = apply_batch(module, params, both, rng)
    sums_B = jnp.sum(token_log_probs(logits_BTV, both["targets"]) * both["weights"], axis=1)
    chosen, rejected = jnp.split(sums_B, 2)
    losses, margin = dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"],
                              self.beta)
    real = (batch["chosen_weights"].sum(1) > 0).astype(jnp.float32)  # eval padding rows
    return {"loss_sum": jnp.sum(losses * real), "weight_sum": jnp.sum(real),
            "correct_sum": jnp.sum((margin > 0) * real),
            "chosen_reward_sum": jnp.sum(self.beta * (chosen - batch["ref_chosen"]) * real),
            "rejected_reward_sum": jnp.sum(self.beta * (rejected - batch["ref_rejected"]) * real)
            }, aux


register(DirectPreference("dpo", ("decoder",)))
