"""Encoder-decoder (T5 / BART): attention directions, cached generation, full-size shapes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import t5 as t5_configs
from llm import config as config_lib
from llm.inference import SamplingConfig, generate_seq2seq, generate_sequences
from llm.models import build
from tests.helpers import random_params

T5_TINY = dict(family="encoder_decoder", vocab_size=64, d_model=32, num_layers=2,
               num_decoder_layers=3, num_heads=4, d_ff=64, max_len=32, positions="relative",
               norm="rmsnorm", use_bias=False, activation="geglu", scale_attention=False,
               tie_embeddings=False)
BART_TINY = dict(family="encoder_decoder", vocab_size=64, d_model=32, num_layers=2,
                 num_heads=4, d_ff=64, max_len=32, positions="learned", position_offset=2,
                 post_norm=True, embed_norm=True, activation="gelu_exact")
ENCODER_IN = np.array([[5, 6, 7, 8, 9, 1], [10, 11, 12, 1, 0, 0]])


MODELS = {"t5": T5_TINY, "bart": BART_TINY}
DECODER_LEN = 7  # every uncached call decodes at this length: one compile per encoder length


@functools.lru_cache(maxsize=None)
def _model(name):
  """(module, params, jitted apply), shared by the tests. Params are drawn without compiling
  init (helpers.random_params), at 10x the init's scale: a draw whose greedy outputs
  vary from step to step."""
  module = build(config_lib.model_from_dict(MODELS[name]))
  params = random_params(module, ENCODER_IN, np.ones((2, 3), np.int32), std=0.2)
  return module, params, jax.jit(module.apply)


def _log_softmax(logits_V):
  shifted = logits_V - logits_V.max()
  return shifted - np.log(np.exp(shifted).sum())


@pytest.mark.parametrize("name", MODELS)
def test_cached_generation_equals_uncached_greedy(name):
  module, params, apply = _model(name)
  prompts = [[5, 6, 7, 8, 9, 1], [10, 11, 12, 1]]
  greedy, rng = SamplingConfig(temperature=0, max_new_tokens=6), jax.random.PRNGKey(0)
  out = generate_sequences(module, params, prompts, greedy, rng)
  assert generate_seq2seq(module, params, prompts, greedy, rng) == out.lists()
  for prompt, got, got_logprobs in zip(prompts, out.lists(), out.logprobs):
    # Uncached: the whole decoder input each step, at one fixed shape (the decoder is
    # causal, so the zeros after position i do not change the logits at i).
    decoded = np.zeros((1, DECODER_LEN), np.int32)
    logprobs = []
    for i in range(6):
      logits_V = np.asarray(apply({"params": params}, np.array([prompt]), decoded)[0, i])
      decoded[0, i + 1] = int(np.argmax(logits_V))
      logprobs.append(_log_softmax(logits_V)[decoded[0, i + 1]])
    assert got == decoded[0, 1:].tolist()
    # Log-probs too: a greedy token can survive a wrong cache that its logits do not.
    np.testing.assert_allclose(got_logprobs, logprobs, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_decoder_is_causal_and_sees_the_whole_encoder_input(name):
  _, params, apply = _model(name)
  decoder_in = jnp.array([[0, 3, 4, 5, 6, 7, 8]])
  encoder_in = jnp.array([[5, 6, 7, 8, 9, 1]])
  base = apply({"params": params}, encoder_in, decoder_in)
  changed_future = apply({"params": params}, encoder_in, decoder_in.at[0, 4].set(20))
  np.testing.assert_allclose(changed_future[0, :4], base[0, :4], atol=1e-6)
  assert np.abs(changed_future[0, 4:] - base[0, 4:]).max() > 1e-4
  changed_encoder_end = apply({"params": params}, encoder_in.at[0, 4].set(30), decoder_in)
  assert np.abs(changed_encoder_end[0, 0] - base[0, 0]).max() > 1e-4  # bidirectional input


def test_encoder_input_embeddings_replace_the_token_lookup():
  _, params, apply = _model("bart")  # learned positions and the embedding norm come after
  encoder_in, decoder_in = jnp.array([[5, 6, 7, 8, 9, 1]]), jnp.array([[0, 3, 4, 5, 6, 7, 8]])
  embeds = jnp.take(params["embed"]["embedding"], encoder_in, axis=0)  # no scaling
  np.testing.assert_allclose(
      apply({"params": params}, None, decoder_in, encoder_inputs_embeds_BSD=embeds),
      apply({"params": params}, encoder_in, decoder_in), atol=1e-5)  # f32 fusion order
  with pytest.raises(ValueError, match="either tokens or encoder_inputs_embeds_BSD"):
    apply({"params": params}, encoder_in, decoder_in, encoder_inputs_embeds_BSD=embeds)


def test_encoder_padding_is_invisible():
  _, params, apply = _model("t5")
  decoder_in = np.array([[0, 3, 4, 5, 6, 7, 8]])
  padded = apply({"params": params}, np.array([[10, 11, 12, 1, 0, 0]]), decoder_in)
  alone = apply({"params": params}, np.array([[10, 11, 12, 1]]), decoder_in)
  np.testing.assert_allclose(padded, alone, atol=1e-5)


def test_t5_small_has_the_published_parameter_count():
  cfg = config_lib.from_configdict(t5_configs.get_config("small")).model
  shapes = jax.eval_shape(build(cfg).init, jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32),
                          jnp.ones((1, 4), jnp.int32))
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(shapes)["params"]))
  assert count == 60_506_624  # t5-small (HF T5ForConditionalGeneration)
