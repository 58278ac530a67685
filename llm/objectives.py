"""Training objectives: one registered object per objective owns its data (rows and
per-step batches), the model call and the loss, so `train_step` and the loop never
branch on the objective (nanodo passes the loss into the step the same way).

An objective's loss is `(module, trainable, frozen, batch, rng) -> (sums, aux)`: sums
are summed over tokens (loss_sum, weight_sum, correct_sum, ...) so that gradient
accumulation and multi-batch evaluation weight every token equally; entries of aux
ending in "_loss" are already weighted and added to the loss per token.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from llm.data import pipeline, source_mixture
from llm.data.sources import DataError
from llm.models import apply_batch, build

Batch = dict


def token_losses(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> dict:
  """Sums (not means) of loss, weight and correct predictions over the weighted tokens.

  A token counts as correct when its logit reaches the row's max, which the log-sum-exp
  needs anyway: no separate argmax pass over the (B, T, V) logits (a tie with another id
  counts as correct). The target's logit is a gather (a masked sum over V would be
  materialised by XLA:CPU before its reduction: 64 MB at the benchmark shape).
  """
  logits_BTV = logits_BTV.astype(jnp.float32)
  max_BT1 = jax.lax.stop_gradient(jnp.max(logits_BTV, axis=-1, keepdims=True))
  lse_BT = jnp.log(jnp.sum(jnp.exp(logits_BTV - max_BT1), axis=-1)) + max_BT1[..., 0]
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  weights_BT = weights_BT.astype(jnp.float32)
  correct_BT = (target_BT >= max_BT1[..., 0]).astype(jnp.float32)
  return {"loss_sum": jnp.sum((lse_BT - target_BT) * weights_BT),
          "weight_sum": jnp.sum(weights_BT),
          "correct_sum": jnp.sum(correct_BT * weights_BT)}


def merge_params(trainable: dict, frozen: dict) -> dict:
  """One param tree from the two partitions (see `llm.peft.partition`)."""
  out = dict(frozen)
  for key, value in trainable.items():
    out[key] = merge_params(value, frozen[key]) if isinstance(value, dict) and key in frozen \
        else value
  return out


@dataclasses.dataclass(frozen=True)
class Objective:
  """Token cross-entropy on `targets` weighted by `weights`; subclasses set the data."""

  name: str
  families: tuple[str, ...]
  rows_fn: Callable = pipeline.packed_lm_rows  # (data_cfg, tokenizer, split) -> rows
  batch_fn: Callable = pipeline.identity_batch_fn  # (data_cfg, tokenizer) -> (rows, step) -> batch

  def rows(self, cfg, tokenizer, split: str) -> Batch:
    rows = source_mixture.rows(self.rows_fn, data_config(cfg), tokenizer, split)
    return check_rows(rows, cfg, split) if isinstance(rows, dict) else rows  # or MixedRows

  def batches(self, cfg, tokenizer) -> Callable[[Batch, int], Batch]:
    """(rows of one batch, step) -> the model's batch; prompt tuning's virtual tokens are
    put in front here, whatever the objective."""
    from llm.peft.prompt import num_virtual_tokens, with_virtual_tokens
    make = self.batch_fn(data_config(cfg), tokenizer)
    if not num_virtual_tokens(cfg.model.peft):
      return make
    return lambda rows, step: with_virtual_tokens(make(rows, step), cfg.model)

  def eval_set(self, cfg, tokenizer, rows) -> list[Batch]:
    return pipeline.eval_set(self.batches(cfg, tokenizer), rows, cfg.data.batch_size,
                             cfg.train.eval_batches, jax.process_index(), jax.process_count())

  def example_batch(self, cfg, batch_size: int = 1) -> Batch:
    """Zeros shaped like a batch (for init, tracing and benchmarks)."""
    shape = (batch_size, cfg.data.seq_len)
    zeros = lambda dtype: np.zeros(shape, dtype)
    return {"inputs": zeros(np.int32), "targets": zeros(np.int32),
            "segment_ids": np.ones(shape, np.int32), "positions": zeros(np.int32),
            "weights": np.ones(shape, np.float32), "encoder_inputs": zeros(np.int32),
            "encoder_segment_ids": np.ones(shape, np.int32)}

  def model_kwargs(self, batch: Batch) -> dict:
    return {}

  def configured(self, cfg) -> "Objective":
    """This objective with the run's settings its loss needs (DPO's beta, a teacher)."""
    return self

  def build(self, cfg):
    """The module trained (a reward model or a policy with a value head adds its head)."""
    return build(cfg.model)

  def trainable(self, cfg) -> str:
    """Regex over param paths of what trains: train.trainable, else the method's default."""
    from llm.peft import trainable_pattern
    return trainable_pattern(cfg.model.peft, cfg.train.trainable)

  def initial_params(self, cfg, params: dict | None) -> dict | None:
    """The start of training (host arrays; None = random init): pretrained weights
    overlaid on a fresh init, plus what the objective brings (a distillation teacher)."""
    return params

  def model_params(self, params: dict) -> dict:
    """What `llm.models.build(cfg.model)` runs on, of the train state's params (trainable
    and frozen): all of them, less what only training needs (a distillation teacher)."""
    return params

  def loss(self, module, trainable, frozen, batch: Batch, rng) -> tuple[dict, dict]:
    params = merge_params(trainable, frozen)
    logits_BTV, aux = apply_batch(module, params, batch, rng, **self.model_kwargs(batch))
    return token_losses(logits_BTV, batch["targets"], batch["weights"]), aux


def check_rows(rows: Batch, cfg, split: str) -> Batch:
  """`rows` unless they hold no token to learn or score: an empty evaluation split would
  report a loss of 0.0, an empty training split would fail later and less clearly."""
  count = min((len(v) for v in rows.values()), default=0)
  if count and ("weights" not in rows or rows["weights"].any()):
    return rows
  d = cfg.data
  field = "eval_split" if split == d.eval_split else "train_split"
  source = f"config.data.tasks={d.tasks!r}" if d.objective == "sft" else \
      f"config.data.source={d.source!r}"
  raise DataError(f"config.data.{field}={split!r} of {source} has no {d.objective} examples "
                  f"({count} rows{'' if not count else ', no weighted token'}); add data or "
                  "choose another split")


def data_config(cfg):
  """The data config rows are built with: prompt / prefix tuning's virtual tokens take
  seq_len room."""
  from llm.peft.prompt import num_virtual_tokens
  if not num_virtual_tokens(cfg.model.peft):
    return cfg.data
  return dataclasses.replace(cfg.data, seq_len=cfg.data.seq_len - cfg.model.peft.prompt_length)


@dataclasses.dataclass(frozen=True)
class PrefixLM(Objective):
  def model_kwargs(self, batch):
    return {"prefix_BT": batch["prefix"]}


@dataclasses.dataclass(frozen=True)
class MaskedLM(Objective):
  def model_kwargs(self, batch):
    return {"output": "mlm"}


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
  OBJECTIVES[objective.name] = objective
  return objective


@dataclasses.dataclass(frozen=True)
class SupervisedFineTuning(Objective):
  """Instruction / task fine-tuning: the loss on completion tokens (and EOS) only; for an
  encoder, label classification by a head (`Classification`)."""

  def rows(self, cfg, tokenizer, split: str) -> Batch:
    from llm.data.sft_data import sft_split_rows
    return check_rows(sft_split_rows(cfg, data_config(cfg), tokenizer, split), cfg, split)

  def configured(self, cfg) -> Objective:
    if cfg.model.family == "encoder":
      return Classification(self.name, self.families)
    return self


@dataclasses.dataclass(frozen=True)
class Classification(SupervisedFineTuning):
  """An encoder's sft: cross-entropy of the classifier head on the [CLS] (first) token
  against the row's label (the tasks' shared label set); the new head always trains."""

  def example_batch(self, cfg, batch_size: int = 1) -> Batch:
    return {**super().example_batch(cfg, batch_size),
            "labels": np.zeros((batch_size,), np.int32)}

  def build(self, cfg):
    from llm.data.sft_data import classification_labels, load_tasks
    labels = classification_labels(load_tasks(cfg.data, cfg.data.shuffle_seed)[0])
    return build(cfg.model, num_labels=len(labels))

  def trainable(self, cfg) -> str:
    return f"{super().trainable(cfg)}|^classifier/"

  def model_kwargs(self, batch):
    return {"output": "classify"}

  def loss(self, module, trainable, frozen, batch, rng):
    logits_BL, aux = apply_batch(module, merge_params(trainable, frozen), batch, rng,
                                 **self.model_kwargs(batch))
    real_B = batch["segment_ids"][:, 0] > 0  # eval padding rows carry no label
    return token_losses(logits_BL, batch["labels"], real_B), aux


register(Objective("clm", ("decoder",)))
register(SupervisedFineTuning("sft", ("decoder", "encoder_decoder", "encoder")))
register(PrefixLM("prefix_lm", ("decoder",), batch_fn=pipeline.prefix_lm_batch_fn))
register(MaskedLM("mlm", ("encoder",), rows_fn=pipeline.mlm_rows,
                  batch_fn=pipeline.mlm_batch_fn))
register(Objective("span", ("encoder_decoder",), rows_fn=pipeline.span_rows,
                   batch_fn=pipeline.span_batch_fn))


def get(name: str) -> Objective:
  return OBJECTIVES[name]


def for_config(cfg) -> Objective:
  """The run's objective, configured (`Objective.configured`)."""
  return get(cfg.data.objective).configured(cfg)


# Objectives defined beside their methods register themselves when imported.
from llm.align import dpo, ppo, reward  # noqa: E402,F401
from llm.compress import distill  # noqa: E402,F401
