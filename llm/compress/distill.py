"""Knowledge distillation (Hinton et al. 2015) into a smaller student of the same tokenizer:

  loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * cross-entropy(student, labels)

per token. The teacher's params sit in the frozen part of the train state (`teacher/...`)
and run in the same jitted step under `stop_gradient`; the student trains on the
pretraining text (packed rows, as causal LM). T^2 keeps the soft term's gradients at
the scale of the hard one's as T grows. alpha = 0 is plain training of the same student
on the same batches: the baseline distillation is compared against.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from llm.config import ConfigError, ModelConfig, PeftConfig
from llm.data.tokenizer import TOKENIZER_FILE
from llm.models import apply_batch, build
from llm.objectives import Objective, merge_params, register, token_losses

TEACHER = "teacher"


def distill_loss(student_logits_BTV, teacher_logits_BTV, targets_BT, alpha: float,
                 temperature: float):
  """(per-token loss, soft KL term, hard cross-entropy term), all (B, T)."""
  student = student_logits_BTV.astype(jnp.float32)
  teacher = jax.lax.stop_gradient(teacher_logits_BTV.astype(jnp.float32))
  log_p_teacher = jax.nn.log_softmax(teacher / temperature)
  log_p_student = jax.nn.log_softmax(student / temperature)
  soft_BT = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
  hard_BT = optax.softmax_cross_entropy_with_integer_labels(student, targets_BT)
  return alpha * temperature ** 2 * soft_BT + (1 - alpha) * hard_BT, soft_BT, hard_BT


class WithTeacher(nn.Module):
  """The student (its own tree) with the teacher beside it under `teacher/`."""

  cfg: ModelConfig
  teacher_cfg: ModelConfig

  def setup(self):
    self.student = build(self.cfg)
    nn.share_scope(self, self.student)
    self.teacher = build(self.teacher_cfg)

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, deterministic=True,
               with_teacher: bool = False):
    logits_BTV = self.student(tokens_BT, positions_BT, segment_ids_BT,
                              deterministic=deterministic)
    if not (with_teacher or self.is_initializing()):
      return logits_BTV
    teacher_BTV = self.teacher(tokens_BT, positions_BT, segment_ids_BT, deterministic=True)
    return logits_BTV, jax.lax.stop_gradient(teacher_BTV)


def teacher_model(path: str) -> ModelConfig:
  """The teacher workdir's model as it runs here (a LoRA teacher is merged on loading)."""
  from llm.train.checkpoint import read_config  # training imports the objectives
  if not path:
    raise ConfigError("config.compress.teacher is empty: give the trained teacher's workdir")
  return dataclasses.replace(read_config(path).model, peft=PeftConfig())


def check_student(student: ModelConfig, teacher: ModelConfig) -> None:
  if student.family != "decoder" or teacher.family != "decoder":
    raise ConfigError("distillation here is between decoders; config.model.family and the "
                      "teacher's must be 'decoder'")
  if student.vocab_size != teacher.vocab_size:
    raise ConfigError(f"config.model.vocab_size={student.vocab_size} but the teacher's is "
                      f"{teacher.vocab_size}: teacher and student need the same vocabulary "
                      "(the student uses the teacher's tokenizer)")


def student_config(cfg):
  """The run's config with the teacher's tokenizer and vocabulary checked. A student
  from train.init_from is checked by the run once it has that model's architecture
  (`Distillation.configured`); the config's model fields do not describe it."""
  teacher = teacher_model(cfg.compress.teacher)
  if not cfg.train.init_from:
    check_student(cfg.model, teacher)
  data = cfg.data
  tokenizer = os.path.join(cfg.compress.teacher, TOKENIZER_FILE)
  if data.tokenizer_path and os.path.abspath(data.tokenizer_path) != os.path.abspath(tokenizer):
    raise ConfigError(f"config.data.tokenizer_path={data.tokenizer_path!r}: the student must "
                      "use the teacher's tokenizer; leave it empty")
  return dataclasses.replace(cfg, data=dataclasses.replace(data, tokenizer_path=tokenizer))


@dataclasses.dataclass(frozen=True)
class Distillation(Objective):
  teacher_cfg: ModelConfig | None = None
  alpha: float = 0.5
  temperature: float = 2.0

  def configured(self, cfg):
    teacher = teacher_model(cfg.compress.teacher)
    check_student(cfg.model, teacher)
    return dataclasses.replace(self, teacher_cfg=teacher, alpha=cfg.compress.distill_alpha,
                               temperature=cfg.compress.distill_temperature)

  def build(self, cfg):
    return WithTeacher(cfg.model, self.teacher_cfg)

  def trainable(self, cfg) -> str:
    return f"^(?!{TEACHER}/).*(?:{super().trainable(cfg)})"

  def initial_params(self, cfg, params):
    from llm.train import init_from
    from llm.train.state import init_params
    if params is None:
      module = self.build(cfg)
      example = self.example_batch(cfg, 1)
      params = jax.device_get(jax.jit(lambda: init_params(module, example, cfg.train.seed))())
    _, teacher, _ = init_from.pretrained(cfg.compress.teacher)
    return {**params, TEACHER: init_from.overlay(params[TEACHER], teacher)}

  def model_params(self, params):
    return {k: v for k, v in params.items() if k != TEACHER}

  def loss(self, module, trainable, frozen, batch, rng):
    params = merge_params(trainable, frozen)
    (student, teacher), aux = apply_batch(module, params, batch, rng, with_teacher=True)
    per_token, soft, hard = distill_loss(student, teacher, batch["targets"], self.alpha,
                                         self.temperature)
    weights = batch["weights"].astype(jnp.float32)
    sums = token_losses(student, batch["targets"], weights)
    return {**sums, "loss_sum": jnp.sum(per_token * weights),
            "hard_loss_sum": sums["loss_sum"], "soft_kl_sum": jnp.sum(soft * weights)}, aux


register(Distillation("distill", ("decoder",)))
