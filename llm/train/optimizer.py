"""AdamW with linear warmup, cosine decay and global-norm clipping."""

import jax
import optax

from llm.config import TrainConfig


def schedule(tcfg: TrainConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=tcfg.learning_rate,
      warmup_steps=max(tcfg.warmup_steps, 1),
      decay_steps=max(tcfg.steps, tcfg.warmup_steps + 1),
      end_value=tcfg.learning_rate * tcfg.min_lr_ratio)


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
  return optax.chain(
      optax.clip_by_global_norm(tcfg.grad_clip),
      optax.adamw(schedule(tcfg), b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps,
                  weight_decay=tcfg.weight_decay, mask=_decay_mask))
