"""The one train step and eval step: pure functions of (state, batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llm.train.state import TrainState


def _split_microbatches(batch: dict, n: int) -> dict:
  return jax.tree_util.tree_map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
  """One optimizer update of the trainable params on `batch`, accumulating over
  `state.microbatches` slices.

  Gradients are of the summed token loss and divided once by the total token weight,
  so accumulation gives exactly the gradient of the full-batch mean loss. Entries of
  `aux` whose names end in "_loss" (e.g. MoE load balancing, already weighted) are
  added to the loss per token; every `*_sum` the loss returns becomes a metric
  (divided by the token weight) and all of `aux` is reported as it is.
  """
  rng, step_rng = jax.random.split(state.rng)

  def grads_of(params, microbatch, mb_rng):
    def objective(p):
      sums, aux = state.loss_fn(p, state.frozen, microbatch, mb_rng)
      aux_loss = sum(v for k, v in aux.items() if k.endswith("_loss"))
      return sums["loss_sum"] + aux_loss * sums["weight_sum"], (sums, aux)
    return jax.grad(objective, has_aux=True)(params)

  if state.microbatches == 1:
    grads, (sums, aux) = grads_of(state.params, batch, step_rng)
  else:
    micro = _split_microbatches(batch, state.microbatches)
    rngs = jax.random.split(step_rng, state.microbatches)

    def accumulate(carry, xs):
      g, (s, a) = grads_of(state.params, *xs)
      return jax.tree_util.tree_map(jnp.add, carry, (g, s)), a

    first = jax.tree_util.tree_map(lambda x: x[0], (micro, rngs))
    sum_shapes = jax.eval_shape(lambda: state.loss_fn(state.params, state.frozen, *first)[0])
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   (jax.eval_shape(lambda: state.params), sum_shapes))
    (grads, sums), aux = jax.lax.scan(accumulate, zeros, (micro, rngs))
    aux = jax.tree_util.tree_map(lambda x: x.mean(0), aux)  # per-micro-batch stats averaged

  denom = jnp.maximum(sums["weight_sum"], 1.0)
  grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**mean_metrics(sums, "train_"), "grad_norm": optax.tree.norm(grads),
             "tokens": sums["weight_sum"], **aux}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
  return new_state, metrics


def mean_metrics(sums: dict, prefix: str) -> dict:
  """{prefix + name: sum / weight_sum} for every `name_sum` but the weight itself."""
  denom = jnp.maximum(sums["weight_sum"], 1.0)
  return {prefix + k[:-len("_sum")].replace("correct", "accuracy"): v / denom
          for k, v in sums.items() if k.endswith("_sum") and k != "weight_sum"}


def eval_step(state: TrainState, batch: dict) -> dict:
  """The loss's sums on one batch (deterministic forward)."""
  sums, _ = state.loss_fn(state.params, state.frozen, batch, None)
  return sums
