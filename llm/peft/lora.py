"""LoRA (Hu et al. 2021): y = x W + (alpha / r) x A B, with B zero at init.

The models are untouched: `interceptor` wraps every call of the modules that hold a
weight (`Linear`, the experts' `ExpertLinear`, an `Embed` table) whose module path matches
`peft.lora_targets`, and creates `lora_a` / `lora_b` beside that module's weight, so the
base param tree stays as it is and the LoRA params sit next to the weights they adapt.

On an `Embed` (the token table `/embed$`, or `pos_embed` / `type_embed`) LoRA adapts the
table itself, E + dE with dE = (alpha/r) (A B)^T (A: D x r, B: r x V), in both of its uses:
the lookup takes rows of dE (B[:, ids]^T A^T, never materialising V x D) and the tied head
adds x A B. Both calls of the one module share the one pair, so `merge` is exact. The
lookup's input is ids, so `lora_dropout` applies to the head's input only.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax.numpy as jnp

from llm.config import PeftConfig
from llm.layers.linear import Linear, contract_last, dot, logical_init, take_rows
from llm.layers.moe import ExpertLinear
from llm.models.blocks import Embed


def module_path(module: nn.Module) -> str:
  return "/" + "/".join(module.path)


def _factor(module, name, shape, axes, init):
  return module.param(name, logical_init(init, axes), shape, jnp.float32)


def _a_init(rank):
  # A random (std r^-1/2), B zero: the adapted model starts exactly at the base model and
  # the first steps move B along the random directions A spans.
  return nn.initializers.normal(rank ** -0.5)


def _linear_delta(module: Linear, x, rank):
  in_shape = x.shape[-module.in_dims:]
  a = _factor(module, "lora_a", (*in_shape, rank), (*module.axes[:module.in_dims], None),
              _a_init(rank))
  b = _factor(module, "lora_b", (rank, *module.features), (None, *module.axes[module.in_dims:]),
              nn.initializers.zeros)
  h = dot(x, a, contract_last(x.ndim, module.in_dims), module.dtype)
  return dot(h, b, contract_last(h.ndim, 1), module.dtype)


def _expert_delta(module: ExpertLinear, x_BECI, rank):
  num_experts, size_in = x_BECI.shape[1], x_BECI.shape[-1]
  expert, size_axis, out_axis = module.axes
  a = _factor(module, "lora_a", (num_experts, size_in, rank), (expert, size_axis, None),
              _a_init(rank))
  b = _factor(module, "lora_b", (num_experts, rank, module.features), (expert, None, out_axis),
              nn.initializers.zeros)
  dtype = module.dtype
  h_EBCR = dot(x_BECI, a, (((3,), (1,)), ((1,), (0,))), dtype)
  y_EBCO = dot(h_EBCR, b, (((3,), (1,)), ((0,), (0,))), dtype)
  return jnp.transpose(y_EBCO, (1, 0, 2, 3))


def _embed_factors(module: Embed, rank):
  # Created by whichever use runs first; flax hands the second call the same pair.
  a = _factor(module, "lora_a", (module.features, rank), (module.axes[1], None), _a_init(rank))
  b = _factor(module, "lora_b", (rank, module.num_embeddings), (None, module.axes[0]),
              nn.initializers.zeros)
  return a, b


def _attend_delta(module: Embed, x_BTD, rank):
  a, b = _embed_factors(module, rank)
  h = dot(x_BTD, a, contract_last(x_BTD.ndim, 1), module.dtype)
  return dot(h, b, contract_last(h.ndim, 1), module.dtype)


def _lookup_delta(module: Embed, ids, rank):
  """Rows `ids` of (A B)^T: B's columns `ids` (r numbers each) times A^T."""
  a, b = _embed_factors(module, rank)
  h = take_rows(b.T, ids, module.dtype)
  return dot(h, a, (((h.ndim - 1,), (1,)), ((), ())), module.dtype)


# module class -> the low-rank update of that module's output.
_DELTAS = {Linear: _linear_delta, ExpertLinear: _expert_delta}


def _delta_fn(module, method_name, args, kwargs):
  """The update for this call of `module`, or None for a call LoRA leaves alone."""
  if method_name != "__call__":
    return None
  if isinstance(module, Embed):
    attend = kwargs.get("attend", args[1] if len(args) > 1 else False)
    return _attend_delta if attend else _lookup_delta
  return _DELTAS.get(type(module))


def interceptor(peft: PeftConfig):
  """A `nn.intercept_methods` interceptor adding LoRA to the targeted projections."""
  targets = re.compile(peft.lora_targets)
  scale = peft.lora_alpha / peft.lora_rank

  def intercept(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    delta = _delta_fn(context.module, context.method_name, args, kwargs)
    if delta is None or not targets.search(module_path(context.module)):
      return y
    x = args[0]
    if delta is not _lookup_delta and peft.lora_dropout and context.module.has_rng("dropout"):
      x = nn.Dropout(peft.lora_dropout)(x, deterministic=False, rng=context.module.make_rng(
          "dropout"))
    return y + scale * delta(context.module, x, peft.lora_rank).astype(y.dtype)
  return intercept


def _delta(parent: dict, scale: float):
  """(name, (alpha/r) A B in the layout of the kernel it updates).

  A is (*lead, *in, r) and B (*lead, r, *out), where the leading axes are the stacked
  layers of a scan and, for experts, the expert axis; their count follows from the
  ranks alone. An embedding table E is used as logits = x E^T (and its lookup adds
  the same rows), so dE = (A B)^T.
  """
  a, b = parent["lora_a"], parent["lora_b"]
  name = "embedding" if "embedding" in parent else "kernel"
  kernel = parent[name]
  lead = a.ndim + b.ndim - 2 - kernel.ndim
  rank, lead_shape = a.shape[-1], a.shape[:lead]
  product = a.reshape(*lead_shape, -1, rank) @ b.reshape(*lead_shape, rank, -1)
  if name == "embedding":
    product = jnp.swapaxes(product, -1, -2)
  return name, scale * product.reshape(kernel.shape).astype(kernel.dtype)


def _map_lora_parents(params, fn):
  if not isinstance(params, dict):
    return params
  if "lora_a" in params and "lora_b" in params:
    return fn(params)
  return {k: _map_lora_parents(v, fn) for k, v in params.items()}


def merge(params: dict, peft: PeftConfig) -> dict:
  """The plain base tree with every LoRA update folded into its kernel: W + (alpha/r) A B.

  The merged tree runs on the un-adapted model at the cost of the base model. An
  embedding table gets E + (alpha/r) (A B)^T, exact in both its lookup and tied head
  (the interceptor adapts both uses with the one pair).
  """
  scale = peft.lora_alpha / peft.lora_rank

  def fold(parent):
    name, delta = _delta(parent, scale)
    rest = {k: v for k, v in parent.items() if k not in ("lora_a", "lora_b")}
    return {**rest, name: parent[name] + delta}
  return _map_lora_parents(params, fold)


def unmerge(merged: dict, lora_params: dict, peft: PeftConfig) -> dict:
  """Inverse of `merge`: subtracts the updates again and puts `lora_params` back."""
  scale = peft.lora_alpha / peft.lora_rank

  def walk(base, lora):
    if not isinstance(lora, dict):
      return lora
    out = dict(base)
    if "lora_a" in lora:
      name, delta = _delta({**base, **lora}, scale)
      out[name] = base[name] - delta
    for key, value in lora.items():
      out[key] = walk(base.get(key, {}), value) if isinstance(value, dict) else value
    return out
  return walk(merged, lora_params)
