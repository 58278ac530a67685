"""Train state and its (sharded) creation."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from llm.models import init_args


@struct.dataclass
class TrainState:
  """Everything a train step reads and writes. Static fields are not checkpointed."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  forward: Callable = struct.field(pytree_node=False)  # (params, batch, rng|None) -> (logits, aux)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  microbatches: int = struct.field(pytree_node=False, default=1)

  def checkpoint_items(self) -> dict:
    return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
            "rng": self.rng}

  def replace_items(self, items: dict) -> "TrainState":
    return self.replace(**items)


def init_state(module: nn.Module, forward, tx, example_batch: dict, seed: int,
               microbatches: int = 1, boxed: bool = False) -> TrainState:
  """Initializes params and optimizer state. `boxed` keeps logical-axis metadata."""
  rng = jax.random.PRNGKey(seed)
  init_rng, state_rng = jax.random.split(rng)
  variables = module.init(init_rng, *init_args(module.cfg, example_batch))
  params = variables["params"] if boxed else nn.unbox(variables["params"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng, forward=forward, tx=tx, microbatches=microbatches)
