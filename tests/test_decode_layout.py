"""The batch-1 decode layout: a `RowKernel` Linear is its kernel and bias, and a model
laid out by `one_row_layout` gives the same logits and generates what a batch does."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from llm import config as config_lib
from llm.inference import (SamplingConfig, decode_layout, for_decoding, generate_sequences,
                           one_row_layout)
from llm.inference.quantize import quantize_params
from llm.layers.linear import Linear, RowKernel
from llm.models import build
from tests.helpers import GPT_TINY, LLAMA_TINY, model_and_params, t5_tiny_and_params

_is_row = lambda x: isinstance(x, RowKernel)


def _rows(params) -> list:
  return [x for x in jax.tree_util.tree_leaves(params, is_leaf=_is_row) if _is_row(x)]


@pytest.mark.parametrize("in_dims, features, use_bias", [(1, (3, 4), True), (2, (5,), False)])
def test_row_kernel_linear_is_its_kernel_and_bias(in_dims, features, use_bias):
  x = np.random.default_rng(0).standard_normal((2, 3, 6) if in_dims == 1 else (2, 2, 3),
                                               dtype=np.float32)
  layer = Linear(features, (None,) * (in_dims + len(features)), in_dims, use_bias)
  params = nn.unbox(layer.init(jax.random.PRNGKey(0), x)["params"])
  params = jax.tree_util.tree_map(lambda p: p + 0.5, params)  # a nonzero bias
  kernel = params["kernel"]
  row = RowKernel.of(kernel, params.get("bias"), in_dims)
  assert row.rows.shape == (int(np.prod(features)), int(np.prod(x.shape[-in_dims:])) + 1)
  got = layer.apply({"params": {"kernel": row}}, x)
  np.testing.assert_allclose(got, layer.apply({"params": params}, x), rtol=1e-6, atol=1e-6)
  expected = np.tensordot(x, kernel, in_dims) + (params["bias"] if use_bias else 0)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  back_kernel, back_bias = row.kernel_and_bias()
  np.testing.assert_array_equal(back_kernel, kernel)
  np.testing.assert_array_equal(back_bias, params["bias"] if use_bias else np.zeros(features))
  wrong = RowKernel.of(kernel[..., :1] if in_dims == 2 else kernel[..., :1, :], None, in_dims)
  with pytest.raises(ValueError, match="RowKernel param 'kernel'.*the model expects.*; lay out a "):
    layer.apply({"params": {"kernel": wrong}}, x)


@functools.lru_cache(maxsize=None)
def _decoder(name):
  module, params = model_and_params(**{"gpt": GPT_TINY, "llama": LLAMA_TINY}[name])
  return for_decoding(module.module, jax.tree_util.tree_map(lambda x: x * 4, params))


def _generate(module, params, prompts, n=6):
  return generate_sequences(module, params, prompts, SamplingConfig(temperature=0,
                                                                    max_new_tokens=n),
                            jax.random.PRNGKey(0))


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_one_row_layout_keeps_logits_and_batch_one_generates_as_a_batch_does(name):
  module, params = _decoder(name)
  _, laid = one_row_layout(module, params)
  cfg = module.cfg
  # q/k/v fused, out, up (gate/up fused), down per layer; and an untied head
  assert len(_rows(laid)) == 4 * cfg.num_layers + (not cfg.tie_embeddings)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      laid, is_leaf=_is_row)[0]]
  assert all("norm']['bias']" in p for p in paths if "bias" in p)  # Linear biases inside
  tokens = np.array([[5, 6, 7, 8, 9, 10]], np.int32)
  apply = jax.jit(lambda p: module.apply({"params": p}, tokens))
  np.testing.assert_allclose(apply(laid), apply(params), rtol=1e-5, atol=1e-5)
  again = one_row_layout(module, laid)[1]
  assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(laid)
  assert all(a is b for a, b in zip(_rows(again), _rows(laid)))
  # generate lays batch-1 params out itself (decode_layout); row 0 of a batch is the
  # float layout's
  assert len(_rows(decode_layout(module, params, 1)[1])) == len(_rows(laid))
  assert not _rows(decode_layout(module, params, 2)[1])
  one, batch = _generate(module, params, [[5, 6, 7]]), _generate(module, params, [[5, 6, 7],
                                                                                 [9, 3]])
  np.testing.assert_array_equal(one.tokens[0], batch.tokens[0])
  np.testing.assert_allclose(one.logprobs[0], batch.logprobs[0], atol=1e-5)
  assert len(set(one.tokens[0].tolist())) > 1  # not a constant output either way
  np.testing.assert_array_equal(_generate(module, laid, [[5, 6, 7]]).tokens, one.tokens)


def test_quantized_and_lora_kernels_keep_their_layout():
  module, params = _decoder("gpt")
  q = quantize_params(params, "int8")
  assert jax.tree_util.tree_structure(one_row_layout(module, q)[1]) == \
      jax.tree_util.tree_structure(q)
  lora_cfg = config_lib.model_from_dict({**GPT_TINY, "peft": dict(
      method="lora", lora_targets="attn/out", lora_rank=2)})
  lora = build(lora_cfg)
  lora_params = nn.unbox(jax.jit(lora.init)(jax.random.PRNGKey(0),
                                            np.ones((1, 4), np.int32))["params"])
  lora, lora_params = for_decoding(lora, lora_params)
  laid = one_row_layout(lora, lora_params)[1]
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
      laid, is_leaf=_is_row)[0]]
  assert sum("out']['lora_a']" in p for p in paths) == GPT_TINY["num_layers"]
  assert len(_rows(laid)) == 3 * GPT_TINY["num_layers"]  # all but the adapted outs


def test_seq2seq_batch_one_generates_as_a_batch_does():
  module, params = t5_tiny_and_params()
  assert len(_rows(one_row_layout(*for_decoding(module, params))[1])) > 0
  one = _generate(module, params, [[5, 6, 7, 8]])
  batch = _generate(module, params, [[5, 6, 7, 8], [9, 3]])
  np.testing.assert_array_equal(one.tokens[0], batch.tokens[0])
  np.testing.assert_allclose(one.logprobs[0], batch.logprobs[0], atol=1e-5)
