"""The one train step and eval step: pure functions of (state, batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llm.objectives import token_losses
from llm.train.state import TrainState


def _loss_sums(forward, params, batch, rng):
  logits_BTV, aux = forward(params, batch, rng)
  sums = token_losses(logits_BTV, batch["targets"], batch["weights"])
  return sums, aux


def _split_microbatches(batch: dict, n: int) -> dict:
  return jax.tree_util.tree_map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
  """One optimizer update on `batch`, accumulating over `state.microbatches` slices.

  Gradients are of the summed token loss and divided once by the total token weight,
  so accumulation gives exactly the gradient of the full-batch mean loss. Entries of
  the model's `aux` whose names end in "_loss" (e.g. MoE load balancing, already
  weighted) are added to the loss; all of `aux` is reported in the metrics.
  """
  rng, step_rng = jax.random.split(state.rng)

  def grads_of(params, microbatch, mb_rng):
    def objective(p):
      sums, aux = _loss_sums(state.forward, p, microbatch, mb_rng)
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

    zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "weight_sum",
                                                          "correct_sum")}
    zeros = (jax.tree_util.tree_map(jnp.zeros_like, state.params), zero_sums)
    (grads, sums), aux = jax.lax.scan(accumulate, zeros, (micro, rngs))
    aux = jax.tree_util.tree_map(lambda x: x.mean(0), aux)  # per-micro-batch stats averaged

  denom = jnp.maximum(sums["weight_sum"], 1.0)
  grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"train_loss": sums["loss_sum"] / denom,
             "train_accuracy": sums["correct_sum"] / denom,
             "grad_norm": optax.tree.norm(grads),
             "tokens": sums["weight_sum"], **aux}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict) -> dict:
  """Summed loss / weight / correct on one batch (deterministic forward)."""
  sums, _ = _loss_sums(state.forward, state.params, batch, None)
  return sums
