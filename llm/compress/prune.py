"""Magnitude pruning: global or per-layer to a target sparsity, and N:M structured
sparsity (N non-zeros in every M consecutive weights along an input axis, the 2:4
pattern sparse tensor cores run). Pruning makes masks; the masks live in the optimizer
state (`keep_pruned`) and multiply every update, so pruned weights stay exactly zero
through fine-tuning (weight decay included).

What is pruned: every projection kernel ("kernel" leaves: attention, MLP, an untied LM
head); embeddings, norms and biases are kept, as is usual for language models. In a
scanned stack a kernel is (layers, ...): "layer" scope prunes each layer's matrix alone.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm.config import ConfigError
from llm.peft.partition import path_str


def parse_sparsities(spec: str) -> list[float]:
  try:
    values = [float(s) for s in spec.split(",") if s.strip()]
  except ValueError:
    raise ConfigError(f"config.compress.sparsities={spec!r}: comma-separated numbers, e.g. "
                      "0,0.5,0.9") from None
  for value in values:
    check_sparsity(value, "config.compress.sparsities")
  return values


def check_sparsity(value: float, name: str = "sparsity") -> None:
  if not 0.0 <= value < 1.0:
    raise ConfigError(f"{name}={value}: a sparsity must be in [0, 1) (the share of weights "
                      "set to zero)")


def parse_scopes(spec: str) -> list[str]:
  scopes = [s.strip() for s in spec.split(",") if s.strip()]
  bad = [s for s in scopes if s not in SCOPES]
  if bad or not scopes:
    raise ConfigError(f"config.compress.prune_scopes={spec!r}: comma-separated "
                      f"{' / '.join(SCOPES)}")
  return scopes


def parse_nm(spec: str) -> tuple[int, int]:
  try:
    n, m = (int(x) for x in spec.split(":"))
  except ValueError:
    raise ConfigError(f"config.compress.nm={spec!r}: write N:M, e.g. 2:4") from None
  if not 0 < n < m:
    raise ConfigError(f"config.compress.nm={spec!r}: N:M needs 0 < N < M (N kept of every M)")
  return n, m


SCOPES = ("global", "layer")


def _is_prunable(path: str) -> bool:
  return path.endswith("kernel")


def _scanned(path: str) -> bool:
  return path.startswith("layers/") or "/layers/" in path


def _leaves(params):
  return [(path_str(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(params)]


def _like(params, masks_by_path: dict):
  """A tree shaped like params: the given masks, ones for everything not pruned."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: masks_by_path.get(path_str(p), np.ones(np.shape(x), np.float32)), params)


def _keep_largest(magnitudes: np.ndarray, sparsity: float) -> np.ndarray:
  """A mask zeroing exactly floor(sparsity * size) of the smallest magnitudes."""
  flat = magnitudes.reshape(-1)
  drop = int(np.floor(sparsity * flat.size))
  mask = np.ones(flat.size, np.float32)
  if drop:
    mask[np.argpartition(flat, drop - 1)[:drop]] = 0.0
  return mask.reshape(magnitudes.shape)


def magnitude_masks(params, sparsity: float, scope: str = "global"):
  """Masks (1 keep, 0 pruned) zeroing the smallest-magnitude kernel weights: the
  `sparsity` share of all kernels together (global) or of each matrix (layer)."""
  check_sparsity(sparsity)
  kernels = {p: np.abs(np.asarray(x, np.float32)) for p, x in _leaves(params) if _is_prunable(p)}
  if scope == "global":
    sizes = [k.size for k in kernels.values()]
    flat = _keep_largest(np.concatenate([k.reshape(-1) for k in kernels.values()]), sparsity)
    pieces = np.split(flat, np.cumsum(sizes)[:-1])
    masks = {p: piece.reshape(k.shape) for (p, k), piece in zip(kernels.items(), pieces)}
  elif scope == "layer":
    masks = {p: (np.stack([_keep_largest(layer, sparsity) for layer in k]) if _scanned(p)
                 else _keep_largest(k, sparsity)) for p, k in kernels.items()}
  else:
    raise ConfigError(f"config.compress.prune_scopes: {scope!r} is not one of "
                      f"{' / '.join(SCOPES)}")
  return _like(params, masks)


def nm_masks(params, n: int, m: int):
  """N:M masks: in every M consecutive weights along each kernel's first input axis
  (after the layer axis of a scanned stack), the N of largest magnitude stay."""
  if not 0 < n < m:
    raise ConfigError(f"N:M={n}:{m}: needs 0 < N < M (N kept of every M)")
  masks = {}
  for path, kernel in _leaves(params):
    if not _is_prunable(path):
      continue
    w = np.abs(np.asarray(kernel, np.float32))
    axis = 1 if _scanned(path) else 0
    if w.shape[axis] % m:
      raise ConfigError(f"N:M={n}:{m}: {path} has {w.shape[axis]} inputs along its axis "
                        f"{axis}, not a multiple of {m}; pick an M that divides it")
    moved = np.moveaxis(w, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, m)
    ranks = np.argsort(np.argsort(-groups, axis=-1, kind="stable"), axis=-1)
    mask = (ranks < n).astype(np.float32).reshape(moved.shape)
    masks[path] = np.moveaxis(mask, -1, axis)
  return _like(params, masks)


def apply_masks(params, masks):
  return jax.tree_util.tree_map(lambda x, m: (x * m).astype(x.dtype), params, masks)


def sparsity(params) -> float:
  """The share of zeros among the prunable (kernel) weights."""
  kernels = [np.asarray(x) for p, x in _leaves(params) if _is_prunable(p)]
  return float(sum((k == 0).sum() for k in kernels) / sum(k.size for k in kernels))


class KeepPrunedState(NamedTuple):
  masks: object


def keep_pruned(masks=None) -> optax.GradientTransformation:
  """Multiplies every update by the masks, held in the optimizer state (arguments of the
  jitted step, checkpointed with it), so pruned weights stay exactly zero. Without
  `masks`, they are read off the params it is initialised on: the kernels' zeros (a
  just-pruned model), so one transformation serves every sparsity."""
  def init(params):
    given = masks if masks is not None else jax.tree_util.tree_map_with_path(
        lambda p, x: (x != 0) if _is_prunable(path_str(p)) else jnp.ones_like(x), params)
    return KeepPrunedState(jax.tree_util.tree_map(lambda m: jnp.asarray(m, jnp.float32), given))

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, m: u * m.astype(u.dtype), updates,
                                  state.masks), state
  return optax.GradientTransformation(init, update)


def sweep(cfg, workdir: str, progress: bool = True) -> list[dict]:
  """Perplexity of train.init_from's model pruned to each compress.sparsities in each
  compress.prune_scopes and to compress.nm, before and after train.steps steps of retraining with the masks
  kept. Writes metrics.jsonl (one record per setting) and prune.png."""
  import functools

  from llm import data as data_lib, objectives
  from llm.data.iterator import BatchIterator
  from llm.eval.report import lm_perplexity
  from llm.models import build
  from llm.train import checkpoint as ckpt, init_from
  from llm.train.metrics import MetricsWriter
  from llm.train.optimizer import make_optimizer
  from llm.train.state import init_state
  from llm.train.step import train_step
  if not cfg.train.init_from:
    raise ConfigError("config.train.init_from is empty: give the trained model to prune")
  settings = [(scope, s) for scope in parse_scopes(cfg.compress.prune_scopes)
              for s in parse_sparsities(cfg.compress.sparsities)]
  if cfg.compress.nm:
    n, m = parse_nm(cfg.compress.nm)
    settings.append((cfg.compress.nm, 1 - n / m))
  base_cfg, base_params, tokenizer_file = init_from.pretrained(cfg.train.init_from)
  cfg = init_from.resolve(cfg, base_cfg, tokenizer_file)
  ckpt.check_writable(workdir)
  os.makedirs(workdir, exist_ok=True)
  ckpt.check_config(workdir, cfg, resuming=False)
  ckpt.write_config(workdir, cfg)
  tokenizer = data_lib.get_tokenizer(cfg.data, cfg.model.vocab_size, workdir)
  objective = objectives.for_config(cfg)
  rows = objective.rows(cfg, tokenizer, cfg.data.train_split)
  module = build(cfg.model)
  tx = optax.chain(make_optimizer(cfg.train), keep_pruned())
  step_fn = jax.jit(train_step, donate_argnums=0)
  loss_fn = functools.partial(objective.loss, module)
  make_batch = objective.batches(cfg, tokenizer)
  ppl = lambda params: lm_perplexity(cfg, params, tokenizer, cfg.data.source)
  writer, results = MetricsWriter(workdir), []
  for scope, target in settings:
    masks = nm_masks(base_params, n, m) if ":" in scope else magnitude_masks(
        base_params, target, scope)
    pruned = apply_masks(base_params, masks)
    record = {"scope": scope, "target_sparsity": target, "sparsity": sparsity(pruned),
              "perplexity": ppl(pruned)}
    state = init_state(module, loss_fn, tx, objective.example_batch(cfg, 1), cfg.train.seed,
                       ".*", params=jax.tree_util.tree_map(jnp.asarray, pruned))
    batches = BatchIterator(rows, cfg.data.batch_size, cfg.data.shuffle_seed)
    for step in range(cfg.train.steps):
      state, _ = step_fn(state, make_batch(next(batches), step))
    retrained = jax.device_get(state.params)
    record.update(retrained_perplexity=ppl(retrained), retrained_sparsity=sparsity(retrained))
    writer.write(record)
    results.append(record)
  plot_sweep(results, os.path.join(workdir, "prune.png"))
  return results


def plot_sweep(results: list[dict], path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  scopes = dict.fromkeys(r["scope"] for r in results if ":" not in r["scope"])
  for scope, color in zip(scopes, ("tab:blue", "tab:orange")):
    rows = [r for r in results if r["scope"] == scope]
    for key, style, label in (("perplexity", "--", "pruned"),
                              ("retrained_perplexity", "-", "pruned + retrained")):
      ax.plot([100 * r["sparsity"] for r in rows], [r[key] for r in rows], style, marker="o",
              color=color, label=f"{scope} magnitude, {label}")
  for r in results:
    if ":" in r["scope"]:
      ax.scatter([100 * r["sparsity"]], [r["perplexity"]], marker="x", color="k",
                 label=f"{r['scope']}, pruned")
      ax.scatter([100 * r["sparsity"]], [r["retrained_perplexity"]], marker="+", color="k",
                 s=80, label=f"{r['scope']}, pruned + retrained")
  ax.set_xlabel("sparsity of the projection kernels (%)")
  ax.set_ylabel("validation perplexity")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
