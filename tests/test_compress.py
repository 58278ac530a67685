"""Distillation loss and pruning masks against NumPy references (no model compiles)."""

import jax
import numpy as np
import optax
import pytest

from llm import config as config_lib
from llm.compress import distill, prune
from llm.config import ConfigError


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_distillation_loss_against_numpy():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 3, 7)), rng.normal(size=(2, 3, 7)) * 2
  targets = rng.integers(0, 7, (2, 3))
  # alpha = 1, T = 1, student = teacher: nothing left to learn.
  same, _, _ = distill.distill_loss(teacher, teacher, targets, 1.0, 1.0)
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
  for alpha, temperature in ((1.0, 1.0), (0.3, 2.0), (0.0, 4.0)):
    loss, soft, hard = distill.distill_loss(student, teacher, targets, alpha, temperature)
    p_t, log_s = _log_softmax(teacher / temperature), _log_softmax(student / temperature)
    kl = (np.exp(p_t) * (p_t - log_s)).sum(-1)
    ce = -np.take_along_axis(_log_softmax(student), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(soft, kl, rtol=1e-5)
    np.testing.assert_allclose(hard, ce, rtol=1e-5)
    np.testing.assert_allclose(loss, alpha * temperature ** 2 * kl + (1 - alpha) * ce,
                               rtol=1e-5)
  # The teacher is a constant of the step: no gradient reaches it.
  teacher_grad = jax.grad(lambda t: distill.distill_loss(student, t, targets, 0.5, 2.0)[0].sum())
  assert np.all(np.asarray(teacher_grad(teacher)) == 0)


def test_teacher_and_student_need_one_vocabulary():
  model = config_lib.model_from_dict({"vocab_size": 64})
  distill.check_student(model, model)
  with pytest.raises(ConfigError, match="vocab_size=64 but the teacher's is 128"):
    distill.check_student(model, config_lib.model_from_dict({"vocab_size": 128}))


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"embed": {"embedding": rng.normal(size=(16, 8)).astype(np.float32)},
          "layers": {"mlp": {"wi": {"kernel": rng.normal(size=(2, 8, 12)).astype(np.float32),
                                    "bias": rng.normal(size=(2, 12)).astype(np.float32)}}},
          "head": {"kernel": rng.normal(size=(8, 4)).astype(np.float32)}}


def test_magnitude_masks_global_and_per_layer():
  params = _params()
  kernels = np.concatenate([np.abs(params["layers"]["mlp"]["wi"]["kernel"]).ravel(),
                            np.abs(params["head"]["kernel"]).ravel()])
  for target in (0.0, 0.25, 0.5, 0.9):
    masks = prune.magnitude_masks(params, target, "global")
    pruned = prune.apply_masks(params, masks)
    assert prune.sparsity(pruned) == pytest.approx(np.floor(target * kernels.size) /
                                                   kernels.size)
    kept = np.concatenate([np.abs(pruned["layers"]["mlp"]["wi"]["kernel"]).ravel(),
                           np.abs(pruned["head"]["kernel"]).ravel()])
    if target:  # the smallest magnitudes went, globally
      assert kept[kept > 0].min() >= np.sort(kernels)[int(target * kernels.size) - 1]
    np.testing.assert_array_equal(pruned["embed"]["embedding"], params["embed"]["embedding"])
    np.testing.assert_array_equal(pruned["layers"]["mlp"]["wi"]["bias"],
                                  params["layers"]["mlp"]["wi"]["bias"])
  layer = prune.apply_masks(params, prune.magnitude_masks(params, 0.5, "layer"))
  for matrix in (*layer["layers"]["mlp"]["wi"]["kernel"], layer["head"]["kernel"]):
    assert (matrix == 0).mean() == 0.5  # each layer's matrix alone
  for bad in (-0.1, 1.0):
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\)"):
      prune.magnitude_masks(params, bad)
  with pytest.raises(ConfigError,
                     match=r"config.compress.sparsities=1.5: a sparsity must be in \[0, 1\)"):
    prune.parse_sparsities("0,1.5")


def test_two_four_masks_keep_the_two_largest_of_every_four():
  params = _params(1)
  pruned = prune.apply_masks(params, prune.nm_masks(params, 2, 4))
  head, weights = pruned["head"]["kernel"], np.abs(params["head"]["kernel"])
  groups = head.T.reshape(4, 2, 4)  # along the input axis (8 = 2 groups of 4)
  assert np.all((groups != 0).sum(-1) == 2)
  top = np.sort(weights.T.reshape(4, 2, 4), -1)[..., 2:]
  np.testing.assert_allclose(np.sort(np.abs(groups), -1)[..., 2:], top)
  stacked = pruned["layers"]["mlp"]["wi"]["kernel"]  # (layers, inputs, outputs)
  assert np.all((np.moveaxis(stacked, 1, -1).reshape(2, 12, 2, 4) != 0).sum(-1) == 2)
  for spec in ("4:4", "3:2", "0:4"):
    with pytest.raises(ConfigError, match="needs 0 < N < M"):
      prune.parse_nm(spec)
  with pytest.raises(ConfigError, match="not a multiple of 3"):
    prune.nm_masks(params, 1, 3)


@pytest.mark.parametrize("from_zeros", [False, True])
def test_pruned_weights_stay_zero_through_optimizer_steps(from_zeros):
  params = _params(2)
  masks = prune.magnitude_masks(params, 0.6)
  pruned = prune.apply_masks(params, masks)
  tx = optax.chain(optax.adamw(0.1, weight_decay=0.1),
                   prune.keep_pruned(None if from_zeros else masks))
  state = tx.init(pruned)
  current = pruned
  for seed in range(3):
    grads = _params(10 + seed)  # dense gradients everywhere
    updates, state = tx.update(grads, state, current)
    current = optax.apply_updates(current, updates)
  for path in (("layers", "mlp", "wi", "kernel"), ("head", "kernel")):
    before, after = pruned, current
    for key in path:
      before, after = before[key], after[key]
    assert np.all(np.asarray(after)[np.asarray(before) == 0] == 0)  # exactly zero
    assert np.all(np.asarray(after)[np.asarray(before) != 0] != np.asarray(before)[
        np.asarray(before) != 0])  # the rest trained
  assert not np.allclose(current["layers"]["mlp"]["wi"]["bias"],
                         pruned["layers"]["mlp"]["wi"]["bias"])  # biases are not frozen


def test_distilling_a_model_into_itself_costs_nothing():
  import jax
  from llm.models import build
  from tests.helpers import GPT_TINY, random_batch, random_params
  model = config_lib.model_from_dict(GPT_TINY)
  objective = distill.Distillation("distill", ("decoder",), teacher_cfg=model, alpha=1.0,
                                   temperature=1.0)
  module = distill.WithTeacher(model, model)
  student = random_params(build(model), np.ones((1, 8), np.int32), std=0.3)
  sums, _ = jax.jit(lambda p, f, b: objective.loss(module, p, f, b, None))(
      student, {distill.TEACHER: student}, random_batch())
  assert float(sums["loss_sum"]) == pytest.approx(0.0, abs=1e-4)
  assert float(sums["hard_loss_sum"]) > 0  # the labels alone would still teach something
  assert "^(?!teacher/)" in objective.trainable(config_lib.from_configdict({}))
  # What a loaded workdir runs on (`train.load`): the student alone, not the teacher.
  assert set(objective.model_params({**student, distill.TEACHER: student})) == set(student)
