"""Alignment: reward model from preference pairs, DPO, PPO with a KL penalty to a frozen
reference (`llm.data.preferences` holds the data and the generated task's hidden rule)."""
