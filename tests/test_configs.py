"""The shipped config sizes build: params by jax.eval_shape (nothing is compiled or
allocated) counted against llm.scaling.param_count, the objective's loss traced on one
batch of the config's own shape, and what makes each size what it is."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from llm import config as config_lib, config_cli, models, objectives, scaling

# Sizes not built by any other test, and the trait each is there for.
SIZES = ["configs/gpt.py:small", "configs/gpt.py:llama", "configs/bert.py:roberta",
         "configs/moe.py:tiny"]


def _abstract(spec):
  """(config, param shapes, shapes of the loss's sums and aux) without compiling."""
  cfg = config_lib.from_configdict(config_cli.load_config(spec))
  module = models.build(cfg.model)
  objective = objectives.get(cfg.data.objective)
  batch = objective.example_batch(cfg, 2)
  params = nn.unbox(jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0),
                          *models.batch_inputs(cfg.model, batch, init=True)))["params"])
  sums, aux = jax.eval_shape(lambda p: objective.loss(module, p, {}, batch, None), params)
  return cfg, params, sums, aux


def _sizes(params, keep=lambda path: True) -> int:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return sum(int(np.prod(leaf.shape)) for path, leaf in leaves if keep(path))


@pytest.mark.parametrize("spec", SIZES)
def test_config_sizes_have_the_params_scaling_counts(spec):
  cfg, params, sums, aux = _abstract(spec)
  m = cfg.model
  # param_count counts weights (kernels and embeddings), not biases or norm scales.
  matrices = _sizes(params, lambda path: path[-1].key in ("kernel", "embedding"))
  assert matrices == scaling.param_count(m), (matrices, scaling.param_count(m))
  assert _sizes(params) > matrices  # the rest are biases and scales, a small part
  assert set(sums) >= {"loss_sum", "weight_sum"} and sums["loss_sum"].shape == ()
  d, layers = m.d_model, m.num_layers
  if spec.endswith("gpt.py:small"):  # GPT-2 recipe: tied head, learned positions
    assert "lm_head" not in params and params["pos_embed"]["embedding"].shape == (m.max_len, d)
    assert cfg.data.seq_len <= m.max_len
  elif spec.endswith("gpt.py:llama"):  # grouped-query attention, untied head, no biases
    assert params["layers"]["attn"]["key"]["kernel"].shape == (layers, d, 2, d // m.num_heads)
    assert params["lm_head"]["kernel"].shape == (d, m.vocab_size)
    assert not any(path[-1].key == "bias"
                   for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
  elif spec.endswith("bert.py:roberta"):  # positions start at row 2; one token type
    assert params["pos_embed"]["embedding"].shape == (m.max_len + 2, d)
    assert params["type_embed"]["embedding"].shape == (1, d)
  else:  # MoE: every layer routes to its experts, and the loss reports routing stats
    assert params["layers"]["moe"]["wi"]["kernel"].shape == (layers, 4, d, m.d_ff)
    assert params["layers"]["moe"]["router"]["kernel"].shape == (layers, d, 4)
    assert "moe_aux_loss" in aux and aux["moe_aux_loss"].shape == ()
    assert scaling.param_count(m, active=True) < scaling.param_count(m)
