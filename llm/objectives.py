"""Training objectives as pure functions: weighted token cross-entropy."""

import jax
import jax.numpy as jnp
import optax


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> dict:
  """Sums (not means) of loss, weight and correct predictions over the weighted tokens.

  Returning sums lets gradient accumulation and multi-batch evaluation weight every
  token equally, however the tokens fall into micro-batches.
  """
  logits_BTV = logits_BTV.astype(jnp.float32)
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  weights_BT = weights_BT.astype(jnp.float32)
  correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
  return {"loss_sum": jnp.sum(nll_BT * weights_BT),
          "weight_sum": jnp.sum(weights_BT),
          "correct_sum": jnp.sum(correct_BT * weights_BT)}


def prefix_lm_mask(segment_ids_BT: jax.Array, prefix_BT: jax.Array) -> jax.Array:
  """mask_BTS for a prefix LM: causal, except that prefix tokens see the whole prefix.

  Query t sees key s iff both lie in the same packed segment and either s <= t or
  both are prefix tokens (marked per segment by `llm.data.objectives.prefix_lm_split`),
  so the prefix is encoded bidirectionally and the suffix generated left to right.
  """
  t = segment_ids_BT.shape[1]
  causal_TS = jnp.tril(jnp.ones((t, t), dtype=bool))
  prefix_BT = prefix_BT.astype(bool)
  both_prefix_BTS = prefix_BT[:, :, None] & prefix_BT[:, None, :]
  same_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return (causal_TS[None] | both_prefix_BTS) & same_BTS
