"""The decode state: prefill, multi-token steps with per-row lengths, row gather and
truncate (scanned and unscanned caches), for a decoder and an encoder-decoder; a
reused prefix cache."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from llm import config as config_lib
from llm.config import ConfigError
from llm.inference import (SamplingConfig, decode_step, for_decoding, gather_rows,
                           generate_sequences, prefill, right_pad, truncate_rows)
from llm.inference.prefix_cache import build_prefix_cache, extend_prefix, generate_with_prefix
from llm.models import build
from llm.models.blocks import unscanned
from tests.helpers import LLAMA_TINY, model_and_params

_prefill = jax.jit(prefill, static_argnames=("module", "cache_len"))
_step = jax.jit(decode_step, static_argnames=("module",))
_gather, _truncate = jax.jit(gather_rows), jax.jit(truncate_rows)


@functools.lru_cache(maxsize=None)
def _decoder():
  module, params = model_and_params(**LLAMA_TINY)
  return module, params


def _full_logits(module, params, seq):
  """Logits of `seq` without a cache, at one fixed shape (causal: trailing zeros do not
  change them), so every call shares one compile."""
  padded = np.zeros((1, 16), np.int32)
  padded[0, :len(seq)] = seq
  return np.asarray(module.apply({"params": params}, padded)[0, :len(seq)])


@pytest.mark.parametrize("layout", ["scanned", "for_decoding"])
def test_steps_rollback_and_reorder_match_the_full_forward(layout):
  apply, full_params = _decoder()
  module, params = apply.module, full_params
  if layout == "for_decoding":  # unscanned, q/k/v and SwiGLU gate/up fused
    module, params = for_decoding(module, params)
    assert set(params["layers_0"]["attn"]) >= {"qkv", "out"}
    assert set(params["layers_0"]["mlp"]) == {"wi_gate_up", "wo"}
  rows = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]
  tokens = np.zeros((2, 6), np.int32)
  for b, r in enumerate(rows):
    tokens[b, :len(r)] = r
  state = _prefill(module, params, tokens, np.array([3, 6], np.int32), cache_len=16)
  for b, r in enumerate(rows):
    np.testing.assert_allclose(state.logits_BV[b], _full_logits(apply, full_params, r)[-1],
                               atol=1e-5)

  # Three tokens for row 0, two (and one of padding) for row 1.
  new = np.array([[20, 21, 22], [30, 31, 0]], np.int32)
  logits_BKV, state = _step(module, params, state, new, np.array([3, 2], np.int32))
  rows = [rows[0] + [20, 21, 22], rows[1] + [30, 31]]
  np.testing.assert_array_equal(state.end_B, [6, 8])
  for b, (r, k) in enumerate(zip(rows, [3, 2])):
    full = _full_logits(apply, full_params, r)
    np.testing.assert_allclose(logits_BKV[b, :k], full[-k:], atol=1e-5)
    np.testing.assert_allclose(state.logits_BV[b], full[-1], atol=1e-5)

  # Roll row 0 back to one of its three new tokens (a speculative rejection), then go on.
  state = _truncate(state, np.array([4, 8], np.int32),
                    np.stack([logits_BKV[0, 0], state.logits_BV[1]]))
  rows[0] = rows[0][:4]
  logits_BKV, state = _step(module, params, state, np.array([[40, 41], [42, 43]], np.int32))
  rows = [rows[0] + [40, 41], rows[1] + [42, 43]]
  for b, r in enumerate(rows):
    np.testing.assert_allclose(logits_BKV[b], _full_logits(apply, full_params, r)[-2:], atol=1e-5)

  # Reorder with repeats (beam search), then step each copy differently.
  state = _gather(state, np.array([1, 0, 1]))
  logits_BKV, state = _step(module, params, state, np.array([[50], [51], [52]], np.int32))
  for b, r in enumerate([rows[1] + [50], rows[0] + [51], rows[1] + [52]]):
    np.testing.assert_allclose(logits_BKV[b, 0], _full_logits(apply, full_params, r)[-1], atol=1e-5)


T5_TINY = dict(family="encoder_decoder", vocab_size=64, d_model=32, num_layers=2,
               num_decoder_layers=3, num_heads=4, d_ff=64, max_len=32, positions="relative",
               norm="rmsnorm", use_bias=False, activation="geglu", scale_attention=False,
               tie_embeddings=False)


def test_seq2seq_state_matches_the_full_forward():
  module = build(config_lib.model_from_dict(T5_TINY))
  encoder = np.array([[5, 6, 7, 8, 9, 1], [10, 11, 12, 1, 0, 0]], np.int32)
  params = nn.unbox(jax.jit(module.init)(jax.random.PRNGKey(0), encoder,
                                         np.ones((2, 3), np.int32))["params"])
  params = jax.tree_util.tree_map(lambda x: x * 5 if x.ndim > 1 else x, params)
  module, params = unscanned(module, params)
  segments = (encoder != 0).astype(np.int32)
  state = _prefill(module, params, np.zeros((2, 1), np.int32), np.ones(2, np.int32),
                   cache_len=8, encoder_BS=encoder, encoder_segment_ids_BS=segments)
  logits_BKV, state = _step(module, params, state, np.array([[3, 4], [5, 6]], np.int32))
  state = _gather(state, np.array([1, 1, 0]))
  last_BKV, state = _step(module, params, state, np.array([[7], [8], [9]], np.int32))
  apply = jax.jit(module.apply)
  decoded = np.array([[0, 3, 4], [0, 5, 6]])
  full = apply({"params": params}, encoder, decoded, segments)
  np.testing.assert_allclose(logits_BKV, full[:, 1:], atol=1e-4)
  rows = np.array([1, 1, 0])
  seqs = np.concatenate([decoded[rows], [[7], [8], [9]]], axis=1)
  full = apply({"params": params}, encoder[rows], seqs, segments[rows])
  np.testing.assert_allclose(last_BKV[:, 0], full[:, -1], atol=1e-4)


def test_reused_prefix_equals_full_recomputation_and_is_tied_to_its_model():
  apply, params = _decoder()
  module = apply.module
  prefix = list(range(5, 15))
  suffixes = [[20], [21, 22, 23]]
  cache = build_prefix_cache(module, params, prefix)
  suffix_BS, lengths_B = right_pad(suffixes)
  state = jax.jit(extend_prefix, static_argnames=("module", "cache_len"))(
      *unscanned(module, params), cache.state, suffix_BS, lengths_B, cache_len=16)
  np.testing.assert_array_equal(state.end_B, [11, 13])
  for b, s in enumerate(suffixes):
    np.testing.assert_allclose(state.logits_BV[b], _full_logits(apply, params, prefix + s)[-1],
                               atol=1e-5)
  sampling = SamplingConfig(temperature=0, max_new_tokens=3)
  reused = generate_with_prefix(module, params, cache, suffixes, sampling, jax.random.PRNGKey(0))
  full = generate_sequences(module, params, [prefix + s for s in suffixes], sampling,
                            jax.random.PRNGKey(0))
  np.testing.assert_array_equal(reused.tokens, full.tokens)
  np.testing.assert_allclose(reused.logprobs, full.logprobs, atol=1e-5)
  other = jax.tree_util.tree_map(lambda x: x * 1.01, params)  # e.g. a later checkpoint
  with pytest.raises(ConfigError, match="prefix cache was built by another model"):
    generate_with_prefix(module, other, cache, suffixes, sampling, jax.random.PRNGKey(0))
