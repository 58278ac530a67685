"""Mixture-of-experts MLP: top-k token-choice router, capacity-limited experts, aux losses.

Einsum letters: B batch, T length, D model, F ffn, E experts, C capacity (slots per expert
per group), K top-k choices, G tokens of one routing group.

Routing groups are batch rows (G = T). Dispatch tensors are (G, E, C) with C ~ G k / E, so
their size grows with the square of the group: one row keeps that to B T^2 k cf instead
of (B T)^2 k cf for one group of the whole batch; rows are already sharded over data x fsdp,
so routing (a cumsum over the group) never crosses devices; and which tokens are dropped
depends on the row alone, not on the batch size, micro-batching or the mesh.

Stats leave the layer through the "moe_stats" collection (see `MoE` and
`collect_moe_stats`) rather than "intermediates", so a train step can ask for exactly the
aux losses without also collecting whatever debugging values other layers sow.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llm.config import ModelConfig
from llm.layers.common import dtype_of
from llm.layers.linear import Linear, dot, kernel_param, logical_init
from llm.layers.mlp import ACTIVATIONS, GATED

STATS = "moe_stats"  # the collection MoE layers sow into


# ----------------------------------------------------------------------------- routing


def router_probs(logits_GE: jax.Array) -> jax.Array:
  """Softmax over experts, in float32: bf16 probabilities round nearby experts together."""
  return jax.nn.softmax(logits_GE.astype(jnp.float32), axis=-1)


def expert_capacity(tokens_per_group: int, num_experts: int, top_k: int,
                    capacity_factor: float) -> int:
  """Slots per expert: ceil(capacity_factor * G * k / E), clipped to [1, G].

  A token's k choices are distinct experts, so no expert is ever asked for more than G
  slots; the upper clip spends no memory on slots that cannot fill (and makes one-token
  decoding steps drop nothing).
  """
  slots = math.ceil(capacity_factor * tokens_per_group * top_k / num_experts)
  return max(1, min(tokens_per_group, slots))


def top_k_routing(probs_GE: jax.Array, k: int, capacity: int, renormalize: bool = True,
                  valid_G: jax.Array | None = None):
  """Token-choice top-k routing with a per-expert capacity (GShard / Switch).

  Choices claim slots rank by rank: every token's first choice is placed before any
  token's second choice (within a rank, in token order), so when an expert overflows it
  is the less preferred choices that are dropped. A dropped choice contributes nothing;
  the token's other choices (and the residual around the layer) still carry it.
  Tokens with valid_G false (padding) claim no slot, so left padding in a batch of
  prompts cannot take capacity from the real tokens behind it; they are left out of the
  stats, and their output is zero.

  Returns:
    dispatch_GEC: bool, token g fills slot c of expert e.
    combine_GEC: float32, the gate weight of that (token, expert, slot); zero if dropped.
      Gates are the router probabilities, renormalized over the top k when `renormalize`
      (Mixtral). With k = 1 that makes every gate 1, so the router learns only from the
      aux losses; Switch keeps the raw probability (renormalize=False).
      stats: expert_mask (G, E) multi-hot of the chosen experts before capacity (for the
      load-balancing loss; zero for padding), dropped_fraction (of the valid tokens' k
      choices) and expert_load (E,), the fraction of those choices that went to each
      expert (sums to 1).
  """
  num_tokens, num_experts = probs_GE.shape
  gates_GK, experts_GK = jax.lax.top_k(probs_GE, k)
  if renormalize:
    gates_GK = gates_GK / jnp.sum(gates_GK, axis=-1, keepdims=True)
  # Rank-major order (K before G) is what makes first choices win the slots.
  choice_KGE = jax.nn.one_hot(experts_GK.T, num_experts, dtype=jnp.int32)
  if valid_G is not None:
    choice_KGE = choice_KGE * valid_G.astype(jnp.int32)[None, :, None]
  claimed_KGE = jnp.cumsum(choice_KGE.reshape(k * num_tokens, num_experts), axis=0)
  slot_KG = jnp.sum((claimed_KGE.reshape(k, num_tokens, num_experts) - 1) * choice_KGE, -1)
  kept_KG = (slot_KG < capacity) & (jnp.sum(choice_KGE, -1) > 0)
  slot_KGC = jax.nn.one_hot(slot_KG, capacity, dtype=jnp.float32) * kept_KG[..., None]
  # One rank at a time: a (K, G, E, C) intermediate would be k times the dispatch tensor.
  combine_GEC = jnp.zeros((num_tokens, num_experts, capacity), jnp.float32)
  dispatch_GEC = jnp.zeros((num_tokens, num_experts, capacity), jnp.bool_)
  for rank in range(k):
    placed_GEC = jnp.einsum("ge,gc->gec", choice_KGE[rank].astype(jnp.float32), slot_KGC[rank])
    dispatch_GEC = dispatch_GEC | (placed_GEC > 0)
    combine_GEC = combine_GEC + gates_GK[:, rank, None, None].astype(jnp.float32) * placed_GEC
  choices = jnp.maximum(jnp.sum(choice_KGE), 1).astype(jnp.float32)
  stats = {
      "expert_mask": jnp.sum(choice_KGE, axis=0),
      "dropped_fraction": 1.0 - jnp.sum(kept_KG) / choices,
      "expert_load": jnp.sum(choice_KGE, axis=(0, 1)) / choices,
  }
  return dispatch_GEC, combine_GEC, stats


def load_balancing_loss(probs_GE: jax.Array, expert_mask_GE: jax.Array,
                        valid_G: jax.Array | None = None) -> jax.Array:
  """Switch loss E * sum_e f_e P_e: f_e the fraction of top-k choices routed to e (counts
  / k, so it sums to 1 for any k), P_e the mean router probability of e.

  The f_e are counts, so the gradient reaches the router through P_e alone: it pushes
  probability away from the experts that are chosen most. 1.0 when either is uniform.
  Means run over the valid_G tokens only (padding neither counts nor pulls).
  """
  counts_GE = jax.lax.stop_gradient(expert_mask_GE.astype(jnp.float32))
  fraction_E = jnp.sum(counts_GE, axis=0) / jnp.maximum(jnp.sum(counts_GE), 1.0)
  mean_prob_E = _masked_mean(probs_GE.astype(jnp.float32), valid_G)
  return probs_GE.shape[-1] * jnp.sum(fraction_E * mean_prob_E)


def router_z_loss(logits_GE: jax.Array, valid_G: jax.Array | None = None) -> jax.Array:
  """ST-MoE z-loss, mean over (valid) tokens of logsumexp(logits)^2: keeps router logits
  small, where float32 softmax stays accurate."""
  return _masked_mean(jnp.square(jax.nn.logsumexp(logits_GE.astype(jnp.float32), -1)), valid_G)


def _masked_mean(x_G, valid_G):
  """Mean over the leading (token) axis, counting only valid tokens when a mask is given."""
  if valid_G is None:
    return jnp.mean(x_G, axis=0)
  weights_G = valid_G.astype(x_G.dtype).reshape(-1, *([1] * (x_G.ndim - 1)))
  return jnp.sum(x_G * weights_G, axis=0) / jnp.maximum(jnp.sum(weights_G), 1.0)


# ----------------------------------------------------------------------------- expert parallelism


def _expert_shards() -> int:
  """Size of the `expert` axis of the mesh in context (1 outside one, e.g. decoding)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty or "expert" not in mesh.axis_names else mesh.shape["expert"]


def to_experts(x_BECD: jax.Array) -> jax.Array:
  """Rows split over the expert axis (as every activation's batch is) -> experts split.

  One all-to-all: each device sends the slots of its rows meant for expert shard j to
  device j, and receives every row's slots for its own experts. GSPMD left to itself
  gathers all rows onto every expert device instead (measured on XLA:CPU), moving
  `expert` / (capacity_factor * top_k) times more data, so the exchange is spelled out
  with shard_map over the expert axis alone; the other axes stay automatic.
  """
  if _expert_shards() == 1:
    return x_BECD
  exchange = lambda x: jax.lax.all_to_all(x, "expert", split_axis=1, concat_axis=0, tiled=True)
  return jax.shard_map(exchange, in_specs=P("expert"), out_specs=P(None, "expert"),
                       axis_names={"expert"})(x_BECD)


def from_experts(y_BECD: jax.Array) -> jax.Array:
  """The inverse of `to_experts`: each row's expert outputs back to the row's device."""
  if _expert_shards() == 1:
    return y_BECD
  exchange = lambda y: jax.lax.all_to_all(y, "expert", split_axis=0, concat_axis=1, tiled=True)
  return jax.shard_map(exchange, in_specs=P(None, "expert"), out_specs=P("expert"),
                       axis_names={"expert"})(y_BECD)


# ----------------------------------------------------------------------------- layer


class ExpertLinear(nn.Module):
  """E independent projections x_e W_e + b_e, stored stacked (E, in, out) so that the
  leading `expert` axis can shard over an expert mesh axis. Params are named like
  `Linear`'s (kernel, bias) so the optimizer's weight decay and converters treat them
  alike."""

  features: int
  axes: tuple[str | None, str | None, str | None]  # (expert, in, out)
  use_bias: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02

  @nn.compact
  def __call__(self, x_BECI: jax.Array) -> jax.Array:
    num_experts, size_in = x_BECI.shape[1], x_BECI.shape[-1]
    kernel_EIO = kernel_param(
        self, "kernel", logical_init(nn.initializers.normal(self.init_std), self.axes),
        (num_experts, size_in, self.features), dtype_of(self.param_dtype))
    dtype = dtype_of(self.dtype)
    # Experts are a batch dimension of the one `dot`: (E, B, C, O) out, then B first.
    y_EBCO = dot(x_BECI, kernel_EIO, (((3,), (1,)), ((1,), (0,))), dtype)
    y_BECO = jnp.transpose(y_EBCO, (1, 0, 2, 3))
    if self.use_bias:
      bias_axes = (self.axes[0], self.axes[2])
      bias_EO = self.param("bias", logical_init(nn.initializers.zeros, bias_axes),
                           (num_experts, self.features), dtype_of(self.param_dtype))
      y_BECO = y_BECO + jnp.asarray(bias_EO, dtype)[None, :, None, :]
    return y_BECO


class MoE(nn.Module):
  """y = sum over the token's kept top-k experts e of gate_e * FFN_e(x); drop-in for `MLP`.

  `valid_BT` (e.g. segment_ids != 0) keeps padding out of the experts' slots and out of
  the losses and stats; padding positions get a zero output.

  Sows into the "moe_stats" collection (a no-op unless the caller makes it mutable):
    aux_loss: aux_loss_weight * load-balance + z_loss_weight * z-loss, already weighted;
    dropped_fraction: of the (token, choice) assignments, dropped by capacity;
    expert_load (E,): fraction of assignments per expert, before capacity.
  Each is a Flax sow tuple; `collect_moe_stats` reduces them over layers.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD: jax.Array, deterministic: bool = True,
               valid_BT: jax.Array | None = None) -> jax.Array:
    cfg, moe = self.cfg, self.cfg.moe
    if valid_BT is None:
      valid_BT = jnp.ones(x_BTD.shape[:2], jnp.bool_)
    num_experts, tokens_per_group = moe.num_experts, x_BTD.shape[1]
    capacity = expert_capacity(tokens_per_group, num_experts, moe.top_k, moe.capacity_factor)

    # float32 router: logits differing in the 3rd digit decide which expert runs.
    logits_BTE = Linear((num_experts,), ("embed", None), dtype="float32",
                        param_dtype=cfg.param_dtype, init_std=cfg.init_std,
                        name="router")(x_BTD)
    probs_BTE = router_probs(logits_BTE)
    route = functools.partial(top_k_routing, k=moe.top_k, capacity=capacity,
                              renormalize=moe.renormalize)
    dispatch_BTEC, combine_BTEC, routed = jax.vmap(route)(probs_BTE, valid_G=valid_BT)

    dtype = dtype_of(cfg.dtype)
    # Expert parallelism: rows arrive split over data x fsdp x expert; their slots go to
    # the devices holding their experts (one all-to-all) and the outputs come back.
    on_experts = ("act_expert_batch", "act_expert", None)
    x_BECD = jnp.einsum("btec,btd->becd", dispatch_BTEC.astype(dtype), x_BTD.astype(dtype))
    x_BECD = nn.with_logical_constraint(to_experts(x_BECD), (*on_experts, "act_embed"))
    proj = lambda features, axes, name: ExpertLinear(
        features, axes, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        init_std=cfg.init_std, name=name)
    act = ACTIVATIONS[cfg.activation]
    if cfg.activation in GATED:
      h_BECF = act(proj(cfg.d_ff, ("expert", "embed", "mlp"), "wi_gate")(x_BECD))
      h_BECF = h_BECF * proj(cfg.d_ff, ("expert", "embed", "mlp"), "wi_up")(x_BECD)
    else:
      h_BECF = act(proj(cfg.d_ff, ("expert", "embed", "mlp"), "wi")(x_BECD))
    h_BECF = nn.with_logical_constraint(h_BECF, (*on_experts, "act_mlp"))
    h_BECF = nn.Dropout(cfg.dropout)(h_BECF, deterministic=deterministic)
    y_BECD = proj(cfg.d_model, ("expert", "mlp", "embed"), "wo")(h_BECF)
    y_BECD = from_experts(nn.with_logical_constraint(y_BECD, (*on_experts, "act_embed")))
    y_BTD = jnp.einsum("btec,becd->btd", combine_BTEC.astype(dtype), y_BECD)

    # Balance is measured over the whole batch, not per group: the quantity to balance is
    # each expert's total work, and per-group products of means would weigh rows oddly.
    # So are the stats: counts over the batch, then one division.
    flat = lambda a: a.reshape(-1, num_experts)
    mask_BTE, valid_G = routed["expert_mask"], valid_BT.reshape(-1)
    balance = load_balancing_loss(flat(probs_BTE), flat(mask_BTE), valid_G)
    z_loss = router_z_loss(flat(logits_BTE), valid_G)
    assigned = jnp.maximum(jnp.sum(mask_BTE), 1).astype(jnp.float32)
    self.sow(STATS, "aux_loss", moe.aux_loss_weight * balance + moe.z_loss_weight * z_loss)
    self.sow(STATS, "dropped_fraction", 1.0 - jnp.sum(dispatch_BTEC) / assigned)
    self.sow(STATS, "expert_load", jnp.sum(mask_BTE, axis=(0, 1)) / assigned)
    return y_BTD


def collect_moe_stats(collection: Mapping[str, Any]) -> dict:
  """Reduces a "moe_stats" collection over all MoE layers, wherever they sit in the tree.

  Leaves may carry leading layer axes (nn.scan stacks them) and sit in sow tuples. Returns
  {"aux_loss": sum over layers, "dropped_fraction": mean, "expert_load": mean (E,)}, or {}
  for a model without MoE layers.
  """
  found: dict[str, list[jax.Array]] = {"aux_loss": [], "dropped_fraction": [], "expert_load": []}
  for path, leaf in jax.tree_util.tree_leaves_with_path(collection):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if names and names[-1] in found:
      found[names[-1]].append(jnp.asarray(leaf))
  if not found["aux_loss"]:
    return {}
  num_experts = found["expert_load"][0].shape[-1]
  return {
      "aux_loss": sum(jnp.sum(a) for a in found["aux_loss"]),
      "dropped_fraction": jnp.mean(
          jnp.concatenate([a.reshape(-1) for a in found["dropped_fraction"]])),
      "expert_load": jnp.mean(jnp.concatenate(
          [a.reshape(-1, num_experts) for a in found["expert_load"]]), axis=0),
  }
