"""Per-token log-likelihood for any family: the base of perplexity, label scoring and
few-shot evaluation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm.models import apply_batch


def token_log_probs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """log softmax(logits)[target] per position, in float32."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("module",))
def _log_likelihood(module, params, batch):
  logits_BTV, _ = apply_batch(module, params, batch, **_call_kwargs(module))
  return token_log_probs(logits_BTV, batch["targets"])


def _call_kwargs(module) -> dict:
  return {"output": "mlm"} if module.cfg.family == "encoder" else {}


def log_likelihood(module, params, batch: dict) -> jax.Array:
  """log p(targets_BT[t] | inputs) for every position, shape (B, T), float32.

  `batch` holds the family's inputs as a train batch does: decoders `inputs` (the
  targets shifted right) with optional `segment_ids` / `positions`; encoder-decoders
  also `encoder_inputs` / `encoder_segment_ids`; encoders (MLM) `inputs` with masked
  positions and the original tokens as `targets`. Weight the result by the batch's
  `weights` (or a completion mask) to score only the tokens that matter.
  """
  batch = {k: jnp.asarray(v) for k, v in batch.items() if v is not None}
  return _log_likelihood(module, params, batch)


def perplexity(logp_BT: np.ndarray, weights_BT: np.ndarray) -> float:
  """exp of the weighted mean negative log-likelihood per token."""
  weights_BT = np.asarray(weights_BT, np.float64)
  nll = -float(np.sum(np.asarray(logp_BT, np.float64) * weights_BT))
  return float(np.exp(nll / max(weights_BT.sum(), 1.0)))
