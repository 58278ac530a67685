"""Train state: trainable and frozen params, optimizer state over the trainable part."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from llm import peft
from llm.models import batch_inputs


@struct.dataclass
class TrainState:
  """Everything a train step reads and writes. Static fields are not checkpointed.

  `params` are the trainable params (all of them for full training); `frozen` holds
  the rest (a base model under LoRA, later a reference policy or a teacher): the loss
  sees both, gradients and optimizer state cover `params` only.
  """

  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array
  loss_fn: Callable = struct.field(pytree_node=False)  # (params, frozen, batch, rng) -> (sums, aux)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  microbatches: int = struct.field(pytree_node=False, default=1)

  def checkpoint_items(self) -> dict:
    return {"step": self.step, "params": self.params, "frozen": self.frozen,
            "opt_state": self.opt_state, "rng": self.rng}

  def replace_items(self, items: dict) -> "TrainState":
    return self.replace(**items)

  def all_params(self) -> dict:
    return peft.merge(self.params, self.frozen)


def init_params(module: nn.Module, example_batch: dict, seed: int, boxed: bool = False):
  rng = jax.random.PRNGKey(seed)
  variables = module.init(jax.random.split(rng)[0],
                          *batch_inputs(module.cfg, example_batch, init=True))
  return variables["params"] if boxed else nn.unbox(variables["params"])


def init_state(module: nn.Module, loss_fn, tx, example_batch: dict, seed: int,
               trainable: str, microbatches: int = 1, boxed: bool = False,
               params: Any = None) -> TrainState:
  """Initializes (or takes `params`), splits them by the `trainable` regex, and builds
  the optimizer state of the trainable part. `boxed` keeps logical-axis metadata."""
  if params is None:
    params = init_params(module, example_batch, seed, boxed)
  trainable_params, frozen = peft.split(params, trainable)
  opt_state = tx.init(trainable_params)  # boxed: the moments take the params' logical axes
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable_params, frozen=frozen,
                    opt_state=opt_state, rng=jax.random.split(jax.random.PRNGKey(seed))[1],
                    loss_fn=loss_fn, tx=tx, microbatches=microbatches)
