"""AdamW with linear warmup, cosine decay and global-norm clipping."""

import jax
import jax.numpy as jnp
import optax

from llm.config import TrainConfig
from llm.train import safety


def schedule(tcfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to the peak over warmup_steps, then cosine decay to min_lr_ratio x peak.

  The first step already uses peak / warmup_steps (not 0), so no step is wasted.
  """
  peak, warmup = tcfg.learning_rate, max(tcfg.warmup_steps, 1)
  decay_steps = max(tcfg.steps - warmup, 1)

  def lr(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(step + 1.0, warmup) / warmup
    frac = jnp.clip((step + 1.0 - warmup) / decay_steps, 0.0, 1.0)
    decay = 0.5 * (1 + jnp.cos(jnp.pi * frac))
    cosine = peak * (tcfg.min_lr_ratio + (1 - tcfg.min_lr_ratio) * decay)
    return jnp.where(step + 1.0 < warmup, warm, cosine)
  return lr


def _decay_mask(params):
  """Weight decay on matrices only (kernels, embeddings), never on norms or biases.

  Looks at the last dict key in the path, so boxed (nn.Partitioned) params give the
  same mask, and hence the same optimizer-state structure, as unboxed ones.
  """
  def is_matrix(path, _):
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(keys) and keys[-1] in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
  """Clipped AdamW inside a guard that skips non-finite updates (llm.train.safety)."""
  return safety.guard_nonfinite(optax.chain(
      optax.clip_by_global_norm(tcfg.grad_clip),
      optax.adamw(schedule(tcfg), b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
                  weight_decay=tcfg.weight_decay, mask=_decay_mask)))
