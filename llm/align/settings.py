"""The alignment methods' settings (`config.align`), nested in `llm.config.Config`."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AlignConfig:
  """Preference tuning (`llm.align`): reward model, DPO, PPO with a KL penalty."""

  # Preference pairs: a generated task with a hidden rule (llm.data.preferences) or
  # jsonl:PATH of ranking / pairwise / thumbs records.
  preferences: str = "review"
  dpo_beta: float = 0.1  # DPO: strength of the implicit KL to the reference
  rater: str = ""  # PPO: the reward model's workdir (experiments.reward_model)
  kl_coef: float = 0.1  # PPO: coefficient of the per-token KL to the reference; 0 = none
  kl_target: float = 0.0  # > 0: adaptive coefficient (Ziegler et al.) steering KL/response here
  kl_horizon: int = 10000  # adaptive controller's horizon, in sampled responses
  rollout_batch: int = 64  # prompts per rollout; train.steps counts rollouts
  response_len: int = 24  # max new tokens per response
  temperature: float = 1.0  # rollout sampling temperature
  ppo_epochs: int = 4  # passes over each rollout batch
  ppo_minibatches: int = 4  # optimizer updates per pass
  clip_eps: float = 0.2  # PPO ratio clip
  value_clip: float = 0.2  # value-prediction clip around the rollout's values
  value_coef: float = 0.5  # weight of the value-head loss in the PPO objective
  entropy_coef: float = 0.0  # weight of the policy-entropy bonus (0 = none)
  gamma: float = 1.0  # GAE discount per token
  gae_lambda: float = 0.95  # GAE bias-variance trade-off (1 = Monte Carlo returns)
