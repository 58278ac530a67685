"""The floor: a minimal GPT-2 in plain Flax + optax, the shape of `common.MODEL`.

What anyone would write in an afternoon (nn.Dense layers, an einsum attention, a python
loop over layers, `optax.adamw` behind global-norm clipping, one `jax.jit` of
`value_and_grad`); `train_throughput.py` times it beside ours and the PyTorch peer, and
ours must clear it. Learned positions, pre-LayerNorm, tanh GELU, tied head, float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


class GPT(nn.Module):
  model: dict  # common.MODEL

  @nn.compact
  def __call__(self, ids_BT):
    m = self.model
    d, n = m["d_model"], m["num_heads"]
    b, t = ids_BT.shape
    embed = nn.Embed(m["vocab_size"], d, embedding_init=nn.initializers.normal(0.02))
    x = embed(ids_BT) + nn.Embed(m["max_len"], d)(jnp.arange(t))[None]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for _ in range(m["num_layers"]):
      h = nn.LayerNorm()(x)
      q, k, v = jnp.split(nn.Dense(3 * d)(h).reshape(b, t, 3 * n, d // n), 3, axis=2)
      logits = jnp.einsum("btnh,bsnh->bnts", q, k) / (d // n) ** 0.5
      probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
      x = x + nn.Dense(d)(jnp.einsum("bnts,bsnh->btnh", probs, v).reshape(b, t, d))
      h = nn.Dense(m["d_ff"])(nn.LayerNorm()(x))
      x = x + nn.Dense(d)(jax.nn.gelu(h, approximate=True))
    return embed.attend(nn.LayerNorm()(x))


def loss_fn(module, params, tokens_BT):
  logits = module.apply({"params": params}, tokens_BT[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BT[:, 1:]).mean()


def make(model: dict, tokens_BT):
  """(module, params, opt_state, tx, jitted step): the step maps (params, opt_state,
  tokens) to (params, opt_state, loss)."""
  module = GPT(model)
  params = module.init(jax.random.PRNGKey(0), tokens_BT[:, :-1])["params"]
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.1))

  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(module, p, tokens))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return module, params, tx.init(params), tx, jax.jit(step, donate_argnums=(0, 1))
