"""Encoder (BERT-style) and prefix LM: attention direction, heads, full-size shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bert as bert_configs
from configs import gpt as gpt_configs
from llm import config as config_lib
from llm.models import build, mean_pool
from tests.helpers import GPT_TINY, model_and_params

BERT_TINY = dict(family="encoder", vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                 d_ff=64, max_len=32, post_norm=True, embed_norm=True, type_vocab_size=2,
                 activation="gelu_exact", norm_eps=1e-12)


def _embedding_gradient(module, params, tokens, t, **kwargs):
  """|d(hidden or logits at t) / d(input embedding at each position)|."""
  perturbations = jax.jit(module.init)(jax.random.PRNGKey(0), tokens)["perturbations"]

  def out_at_t(perturb):
    out = module.apply({"params": params, "perturbations": perturb}, tokens, **kwargs)
    return out[0, t].sum()
  grads = jax.jit(jax.grad(out_at_t))(perturbations)["embedded"]
  return np.abs(np.asarray(grads[0])).sum(-1)


def test_encoder_output_at_t_depends_on_later_tokens():
  module, params = model_and_params(**BERT_TINY)
  tokens = jnp.arange(3, 15)[None]
  grad_T = _embedding_gradient(module.module, params, tokens, 4, output="hidden")
  assert (grad_T > 0).all()  # every position, before and after t, influences t


def test_encoder_heads_and_padding():
  module, params = model_and_params(**BERT_TINY)
  tokens = np.array([[2, 10, 11, 12, 1, 0, 0], [2, 20, 21, 22, 23, 24, 1]])
  valid = (tokens != 0).astype(np.int32)
  hidden = module.apply({"params": params}, tokens, None, valid, output="hidden")
  alone = module.apply({"params": params}, tokens[:1, :5], output="hidden")
  np.testing.assert_allclose(hidden[0, :5], alone[0], atol=1e-5)  # padding is invisible
  pooled = mean_pool(hidden, valid)
  np.testing.assert_allclose(pooled[0], alone[0].mean(0), atol=1e-5)
  assert module.apply({"params": params}, tokens, output="mlm").shape == (2, 7, 64)
  assert module.apply({"params": params}, tokens, output="pooled").shape == (2, 32)
  classifier = build(config_lib.model_from_dict(BERT_TINY), num_labels=3)
  cparams = nn.unbox(jax.jit(classifier.init)(jax.random.PRNGKey(0), tokens)["params"])
  assert jax.jit(classifier.apply, static_argnames="output")(
      {"params": cparams}, tokens, output="classify").shape == (2, 3)


def test_prefix_lm_prefix_is_bidirectional_and_suffix_causal():
  module, params = model_and_params(**GPT_TINY)
  tokens = jnp.arange(3, 15)[None]
  prefix = jnp.arange(12)[None] < 5
  grad_in_prefix = _embedding_gradient(module.module, params, tokens, 2, prefix_BT=prefix)
  assert (grad_in_prefix[:5] > 0).all() and (grad_in_prefix[5:] == 0).all()
  grad_in_suffix = _embedding_gradient(module.module, params, tokens, 7, prefix_BT=prefix)
  assert (grad_in_suffix[:8] > 0).all() and (grad_in_suffix[8:] == 0).all()


def _param_count(cfg_dict, **kwargs):
  cfg = config_lib.from_configdict(cfg_dict).model
  module = build(cfg, **kwargs)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))
  return cfg, {k: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(v))
               for k, v in nn.unbox(shapes["params"]).items()}


def test_full_size_parameter_counts_match_the_published_ones():
  _, counts = _param_count(gpt_configs.get_config("gpt2"))
  assert sum(counts.values()) == 124_439_808  # GPT-2 small (HF GPT2LMHeadModel)
  _, counts = _param_count(bert_configs.get_config("base"))
  mlm_head = counts.pop("mlm_dense") + counts.pop("mlm_norm") + counts.pop("mlm_bias")
  assert sum(counts.values()) == 109_482_240  # bert-base-uncased BertModel
  assert mlm_head == 768 * 768 + 768 + 2 * 768 + 30522


def test_mixtral_shaped_config_has_mixtrals_parameter_count():
  from configs import moe as moe_configs
  from llm import scaling
  cfg, counts = _param_count(moe_configs.get_config("mixtral"))
  assert sum(counts.values()) == 46_702_792_704  # Mixtral-8x7B (HF MixtralForCausalLM)
  assert scaling.param_count(cfg, active=True) + cfg.vocab_size * cfg.d_model * 2 > 12.8e9


def test_sequence_longer_than_the_position_table_is_refused():
  module, params = model_and_params(**BERT_TINY)
  with pytest.raises(ValueError, match="exceeds config.model.max_len=32"):
    module.apply({"params": params}, np.ones((1, 40), np.int32), output="hidden")


def test_checkpoint_of_another_family_is_refused(tmp_path):
  from llm.train import checkpoint as ckpt
  decoder_cfg = config_lib.from_configdict({"model": GPT_TINY, "data": {"seq_len": 16}})
  ckpt.write_or_check_config(str(tmp_path), decoder_cfg)
  encoder_cfg = config_lib.from_configdict({"model": BERT_TINY,
                                            "data": {"objective": "mlm", "seq_len": 16}})
  with pytest.raises(config_lib.ConfigError, match="model.family: 'decoder' in workdir"):
    ckpt.write_or_check_config(str(tmp_path), encoder_cfg)
