"""Encoder-decoder (T5 / BART): attention directions, cached generation, full-size shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import t5 as t5_configs
from llm import config as config_lib
from llm.inference import SamplingConfig, generate_seq2seq
from llm.models import build

T5_TINY = dict(family="encoder_decoder", vocab_size=64, d_model=32, num_layers=2,
               num_decoder_layers=3, num_heads=4, d_ff=64, max_len=32, positions="relative",
               norm="rmsnorm", use_bias=False, activation="geglu", scale_attention=False,
               tie_embeddings=False)
BART_TINY = dict(family="encoder_decoder", vocab_size=64, d_model=32, num_layers=2,
                 num_heads=4, d_ff=64, max_len=32, positions="learned", position_offset=2,
                 post_norm=True, embed_norm=True, activation="gelu_exact")
ENCODER_IN = np.array([[5, 6, 7, 8, 9, 1], [10, 11, 12, 1, 0, 0]])


def _model(overrides):
  module = build(config_lib.model_from_dict(overrides))
  params = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), ENCODER_IN,
                                         np.ones((2, 3), np.int32))["params"])
  # Larger weights than the init, so that greedy outputs vary from step to step.
  return module, jax.tree_util.tree_map(lambda x: x * 5 if x.ndim > 1 else x, params)


@pytest.mark.parametrize("overrides", [T5_TINY, BART_TINY], ids=["t5", "bart"])
def test_cached_generation_equals_uncached_greedy(overrides):
  module, params = _model(overrides)
  prompts = [[5, 6, 7, 8, 9, 1], [10, 11, 12, 1]]
  out = generate_seq2seq(module, params, prompts, SamplingConfig(temperature=0,
                                                                 max_new_tokens=6),
                         jax.random.PRNGKey(0))
  apply = jax.jit(module.apply)
  for prompt, got in zip(prompts, out):
    # Uncached: the whole decoder input each step, at one fixed shape (the decoder is
    # causal, so the zeros after position i do not change the logits at i).
    decoded = np.zeros((1, 7), np.int32)
    for i in range(6):
      logits = apply({"params": params}, np.array([prompt]), decoded)
      decoded[0, i + 1] = int(np.argmax(logits[0, i]))
    assert got == decoded[0, 1:].tolist()


@pytest.mark.parametrize("overrides", [T5_TINY, BART_TINY], ids=["t5", "bart"])
def test_decoder_is_causal_and_sees_the_whole_encoder_input(overrides):
  module, params = _model(overrides)
  decoder_in = jnp.array([[0, 3, 4, 5, 6, 7]])
  encoder_in = jnp.array([[5, 6, 7, 8, 9, 1]])
  apply = jax.jit(module.apply)
  base = apply({"params": params}, encoder_in, decoder_in)
  changed_future = apply({"params": params}, encoder_in, decoder_in.at[0, 4].set(20))
  np.testing.assert_allclose(changed_future[0, :4], base[0, :4], atol=1e-6)
  assert np.abs(changed_future[0, 4:] - base[0, 4:]).max() > 1e-4
  changed_encoder_end = apply({"params": params}, encoder_in.at[0, 4].set(30), decoder_in)
  assert np.abs(changed_encoder_end[0, 0] - base[0, 0]).max() > 1e-4  # bidirectional input


def test_encoder_padding_is_invisible():
  module, params = _model(T5_TINY)
  apply = jax.jit(module.apply)
  decoder_in = np.array([[0, 3, 4]])
  padded = apply({"params": params}, np.array([[10, 11, 12, 1, 0, 0]]), decoder_in)
  alone = apply({"params": params}, np.array([[10, 11, 12, 1]]), decoder_in)
  np.testing.assert_allclose(padded, alone, atol=1e-5)


def test_t5_small_has_the_published_parameter_count():
  cfg = config_lib.from_configdict(t5_configs.get_config("small")).model
  shapes = jax.eval_shape(build(cfg).init, jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32),
                          jnp.ones((1, 4), jnp.int32))
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(shapes)["params"]))
  assert count == 60_506_624  # t5-small (HF T5ForConditionalGeneration)
