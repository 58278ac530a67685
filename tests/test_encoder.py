"""Encoder (BERT-style) and prefix LM: attention direction, heads, full-size shapes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bert as bert_configs
from configs import gpt as gpt_configs
from llm import config as config_lib
from llm.models import build, mean_pool
from tests.helpers import (GPT_TINY, JittedApply, embedding_dependence, model_and_random_params,
                           random_params)

BERT_TINY = dict(family="encoder", vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                 d_ff=64, max_len=32, post_norm=True, embed_norm=True, type_vocab_size=2,
                 activation="gelu_exact", norm_eps=1e-12)


@functools.lru_cache(maxsize=None)
def bert():
  """(jitted module, params) of the tiny BERT with a 3-label classifier head, shared by the
  tests (params drawn without compiling init: see helpers.random_params)."""
  module = build(config_lib.model_from_dict(BERT_TINY), num_labels=3)
  return JittedApply(module), random_params(module, np.ones((1, 8), np.int32))


def test_encoder_output_at_t_depends_on_later_tokens():
  module, params = bert()
  dependence_TS = embedding_dependence(module.module, params, np.arange(3, 15)[None],
                                       output="hidden")
  assert (dependence_TS > 0).all()  # every position, before and after t, influences t


@jax.jit
def _every_output(params, tokens, valid):
  module = bert()[0].module
  apply = lambda toks, output, *args: module.apply({"params": params}, toks, *args,
                                                   output=output)
  embeds = jnp.take(params["embed"]["embedding"], tokens, axis=0)
  return {"hidden": apply(tokens, "hidden", None, valid),
          "from_embeds": module.apply({"params": params}, None, None, valid, output="hidden",
                                      inputs_embeds_BTD=embeds),
          "alone": apply(tokens[:1, :5], "hidden"),
          **{output: apply(tokens, output) for output in ("mlm", "pooled", "classify")}}


def test_encoder_heads_and_padding():
  _, params = bert()
  tokens = np.array([[2, 10, 11, 12, 1, 0, 0], [2, 20, 21, 22, 23, 24, 1]])
  valid = (tokens != 0).astype(np.int32)
  out = _every_output(params, tokens, valid)
  hidden, alone = out["hidden"], out["alone"]
  np.testing.assert_allclose(hidden[0, :5], alone[0], atol=1e-5)  # padding is invisible
  np.testing.assert_array_equal(out["from_embeds"], hidden)  # embeddings in, same function
  pooled = mean_pool(hidden, valid)
  np.testing.assert_allclose(pooled[0], alone[0].mean(0), atol=1e-5)
  assert out["mlm"].shape == (2, 7, 64)
  assert out["pooled"].shape == (2, 32)
  assert out["classify"].shape == (2, 3)


def test_prefix_lm_prefix_is_bidirectional_and_suffix_causal():
  module, params = model_and_random_params(**GPT_TINY)
  prefix = jnp.arange(12)[None] < 5
  dependence_TS = embedding_dependence(module.module, params, np.arange(3, 15)[None],
                                       prefix_BT=prefix)
  s, t = np.meshgrid(np.arange(12), np.arange(12))
  seen = (s <= t) | ((s < 5) & (t < 5))  # causal, plus the whole prefix within it
  assert (dependence_TS[seen] > 0).all()
  np.testing.assert_array_equal(dependence_TS[~seen], 0.0)


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
  module, params = bert()
  with pytest.raises(ValueError, match="exceeds config.model.max_len=32"):
    module.apply({"params": params}, np.ones((1, 40), np.int32), output="hidden")


def test_checkpoint_of_another_family_is_refused(tmp_path):
  from llm.train import checkpoint as ckpt
  decoder_cfg = config_lib.from_configdict({"model": GPT_TINY, "data": {"seq_len": 16}})
  ckpt.write_config(str(tmp_path), decoder_cfg)
  encoder_cfg = config_lib.from_configdict({"model": BERT_TINY,
                                            "data": {"objective": "mlm", "seq_len": 16}})
  with pytest.raises(config_lib.ConfigError, match="model.family: 'decoder' in workdir"):
    ckpt.check_config(str(tmp_path), encoder_cfg, resuming=False)
