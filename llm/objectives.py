"""Training objectives as pure functions: weighted token cross-entropy."""

import jax
import jax.numpy as jnp
import optax

from llm.layers.attention import prefix_lm_mask  # noqa: F401 (the mask lives with attention)


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
