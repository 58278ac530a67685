"""Weight-only int8 / int4 quantization: error bounds against NumPy, the integer dot
against a float dot, every family's logits, the tree walk, checkpoints, bad input."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import GPT_TINY, LLAMA_TINY, random_batch
from llm import config as config_lib
from llm.config import ConfigError
from llm.inference import quantize as quant_lib
from llm.inference.decode import for_decoding, prefill
from llm.layers.quant import QArray, concatenate, quantize
from llm.models import apply_batch, build

BERT_TINY = dict(family="encoder", vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                 d_ff=64, max_len=32, post_norm=True)
T5_TINY = dict(family="encoder_decoder", vocab_size=64, d_model=32, num_layers=2,
               num_heads=4, d_ff=64, max_len=32, positions="relative", norm="rmsnorm",
               use_bias=False, activation="geglu", tie_embeddings=False)
# Every token goes to all experts: a top-2 choice would flip for near-tied tokens when
# quantization perturbs the router's input, and move those logits by O(1).
MOE_TINY = dict(LLAMA_TINY, num_layers=2, moe=dict(num_experts=4, top_k=4, every=2))
# Decoder (tied table, scanned), MoE (untied head, dense and MoE groups scanned),
# encoder, encoder-decoder (tied, per-layer params); int4 on the first two.
FAMILIES = {"gpt_tied_scanned": GPT_TINY, "moe_every2": MOE_TINY, "bert": BERT_TINY,
            "t5_tied_unscanned": dict(T5_TINY, tie_embeddings=True, scan_layers=False)}
INT4_FAMILIES = ("gpt_tied_scanned", "moe_every2")


def _numpy_int8(w, axis):
  scale = np.abs(w).max(axis=axis, keepdims=True) / 127
  return np.clip(np.round(w / scale), -127, 127), scale


def test_int8_per_output_channel_matches_numpy_and_error_at_most_half_a_step():
  w = np.random.default_rng(0).standard_normal((48, 4, 8)).astype(np.float32)
  q = quantize(jnp.asarray(w), (0,), 8)
  values, scale = _numpy_int8(w, 0)
  assert q.values.dtype == jnp.int8 and q.values.shape == w.shape
  np.testing.assert_allclose(np.asarray(q.scale)[0, 0], scale[0], rtol=1e-6)
  assert np.mean(np.asarray(q.values) == values) > 0.999  # ties may round either way
  err = np.abs(np.asarray(q.dequantize()) - w)
  assert np.all(err <= scale / 2 * (1 + 1e-5))
  assert np.all(np.abs(np.asarray(q.values)).max(axis=0) == 127)  # each channel's max hits the top


def test_int8_contract_last_stores_each_output_channel_contiguously():
  w = np.random.default_rng(0).standard_normal((4, 12, 8)).astype(np.float32)  # (N, H, D)
  q = quantize(jnp.asarray(w), (0, 1), 8, contract_last=True)  # attention out: (N, H) -> D
  values, scale = _numpy_int8(w.reshape(48, 8), 0)
  assert q.values.shape == (8, 4, 12) and q.scale.shape == (8, 1) and q.shape == w.shape
  np.testing.assert_allclose(np.asarray(q.scale)[:, 0], scale[0], rtol=1e-6)
  assert np.mean(np.asarray(q.values).reshape(8, 48).T == values) > 0.999
  reference = quantize(jnp.asarray(w), (0, 1), 8)  # the float layout: the same numbers
  np.testing.assert_array_equal(q.dequantize(), reference.dequantize())
  with pytest.raises(ValueError, match="contract_last is for int8"):
    quantize(jnp.asarray(w), (0, 1), 4, contract_last=True)


@pytest.mark.parametrize("contracted,groups", [(256, 2), (96, 1)])
def test_int4_groups_of_128_or_the_dimension(contracted, groups):
  w = np.random.default_rng(1).standard_normal((contracted, 6)).astype(np.float32)
  q = quantize(jnp.asarray(w), (0,), 4)
  assert q.values.dtype == jnp.int4 and q.scale.shape == (groups, 1, 6)
  w_g = w.reshape(groups, contracted // groups, 6)
  scale = np.abs(w_g).max(axis=1, keepdims=True) / 7
  np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)
  values = np.asarray(q.values.astype(jnp.int8)).reshape(w_g.shape)
  assert values.min() >= -7 and values.max() <= 7
  err = np.abs(np.asarray(q.dequantize()).reshape(w_g.shape) - w_g)
  assert np.all(err <= scale / 2 * (1 + 1e-5))


# The layouts in the models: Linear (one or two contracted axes), experts, the tied table.
LAYOUTS = {
    "linear": ((2, 3, 160), (160, 24), (((2,), (0,)), ((), ())), (-2,)),
    "query": ((2, 3, 32), (32, 4, 8), (((2,), (0,)), ((), ())), (-3,)),
    "attn_out": ((2, 3, 4, 64), (4, 64, 32), (((2, 3), (0, 1)), ((), ())), (-3, -2)),
    "experts": ((2, 4, 3, 256), (4, 256, 16), (((3,), (1,)), ((1,), (0,))), (-2,)),
    "tied_embedding": ((2, 3, 256), (64, 256), (((2,), (1,)), ((), ())), (-1,)),
    "batch_1": ((1, 1, 384), (384, 20), (((2,), (0,)), ((), ())), (-2,)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_integer_dot_equals_float_dot_of_dequantized(layout):
  x_shape, w_shape, dims, contract = LAYOUTS[layout]
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)

  variants = [(8, False), (4, False)] + ([] if dims[1][1] else [(8, True)])

  @jax.jit
  def both(x, w):
    out = {}
    for bits, last in variants:
      q = quantize(w, contract, bits, contract_last=last)
      out[bits, last] = (q.quantized_dot(x, dims, jnp.float32),
                         jax.lax.dot_general(x, q.dequantize(), dims))
    return out
  for bits, (got, want) in both(x, w).items():
    assert got.shape == want.shape
    # Two int8 limbs per activation: error ~ max|x| / 64516 per product.
    np.testing.assert_allclose(got, want, atol=2e-4 * float(jnp.max(jnp.abs(want))),
                               err_msg=str(bits))


def test_rows_of_a_quantized_table():
  table = jnp.asarray(np.random.default_rng(3).standard_normal((64, 256)), jnp.float32)
  ids = jnp.array([[1, 5, 63], [0, 5, 2]])
  for bits, last in ((8, False), (4, False), (8, True)):
    q = quantize(table, (-1,), bits, contract_last=last)
    np.testing.assert_array_equal(q.quantized_take(ids, jnp.float32), q.dequantize()[ids])


@functools.lru_cache(maxsize=None)
def _family(name):
  """(module, params, batch, jitted logits of params), shared by the tests of this file."""
  overrides = FAMILIES[name]
  cfg = config_lib.model_from_dict(overrides)
  module = build(cfg)
  batch = random_batch(batch=2, seq_len=8)
  if cfg.family == "encoder_decoder":
    batch = dict(batch, encoder_inputs=batch["inputs"], encoder_segment_ids=batch["segment_ids"])
    args = (batch["inputs"], batch["inputs"])
  else:
    args = (batch["inputs"],)
  # Random params of the init's shapes (jitting a MoE init costs more than the test):
  # matrices ~ N(0, 0.08), four times the init's std, so that logits are of order one.
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"])
  rng = np.random.default_rng(0)

  def fill(path, x):
    if len(x.shape) > 1:
      return jnp.asarray(rng.normal(0, 0.08, x.shape), jnp.float32)
    base = 1.0 if str(path[-1].key) == "scale" else 0.0  # norm scales near one
    return jnp.asarray(base + rng.normal(0, 0.02, x.shape), jnp.float32)
  params = jax.tree_util.tree_map_with_path(fill, shapes)
  return module, params, batch, jax.jit(lambda p: apply_batch(module, p, batch)[0])


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_quantized_logits_close_to_float_for_every_family(name):
  _, params, _, apply = _family(name)
  want = apply(params)
  modes = (("int8", 0.02), ("int4", 0.4)) if name in INT4_FAMILIES else (("int8", 0.02),)
  for mode, bound in modes:
    q = quant_lib.quantize_params(params, mode)
    # Every kernel but the router and the token table are QArrays; all else is float.
    for path, leaf in jax.tree_util.tree_leaves_with_path(q, is_leaf=lambda x: isinstance(x, QArray)):
      keys = [str(k.key) for k in path]
      is_matmul = (keys[-1] == "kernel" and "router" not in keys) or keys[-2:] == ["embed", "embedding"]
      assert isinstance(leaf, QArray) == is_matmul, keys
      assert isinstance(leaf, QArray) or leaf.dtype == jnp.float32
    got = apply(q)
    # The integer dots compute the dequantized model's logits...
    dequantized = jax.tree_util.tree_map(lambda x: x.dequantize() if isinstance(x, QArray) else x,
                                         q, is_leaf=lambda x: isinstance(x, QArray))
    assert _rel(got, apply(dequantized)) < 2e-3, mode
    # ...which are near the float model's (a scale on a wrong axis is off by ~100%).
    assert _rel(got, want) < bound, (mode, _rel(got, want))
  half = quant_lib.quantize_params(params, "bf16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(half))


def test_moe_kernels_all_quantized_router_float_and_sizes():
  params = _family("moe_every2")[1]
  q8, q4 = (quant_lib.quantize_params(params, m) for m in ("int8", "int4"))
  found = quant_lib.quantized_kernels(q8)
  experts = [p for p in found if "'moe'" in p]
  assert len(experts) == 3 and all(found.values())  # wi_gate, wi_up, wo of the MoE group
  assert not any("router" in p for p in found)
  f32 = quant_lib.param_bytes(params)
  assert f32 / quant_lib.param_bytes(q8) > 3.0 and f32 / quant_lib.param_bytes(q4) > 4.5
  assert quant_lib.param_bytes(quant_lib.quantize_params(params, "f16")) * 2 == f32


def test_quantized_checkpoint_round_trip_and_mode_mismatch(tmp_path):
  _, params, _, apply = _family("gpt_tied_scanned")
  for mode in ("int8", "int4"):
    q = quant_lib.quantize_params(params, mode)
    quant_lib.save(tmp_path / mode, q, mode)
    back = quant_lib.restore(tmp_path / mode, mode)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(q)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(q)):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    np.testing.assert_array_equal(apply(back), apply(q))
  with pytest.raises(ConfigError, match="holds a int8 checkpoint, not none; restore it with --quant int8"):
    quant_lib.restore(tmp_path / "int8", "none")
  with pytest.raises(ConfigError, match="holds no quantized checkpoint"):
    quant_lib.restore(tmp_path / "missing", "int8")


def test_bad_inputs_are_one_line_errors():
  params = _family("gpt_tied_scanned")[1]
  with pytest.raises(ConfigError, match="--quant 'int3': unknown quantization mode; use one of"):
    quant_lib.quantize_params(params, "int3")
  with pytest.raises(ConfigError, match="already quantized"):
    quant_lib.quantize_params(quant_lib.quantize_params(params, "int8"), "int4")
  wrong = quantize(jnp.ones((32, 16)), (-1,), 8)  # scales along the contracted axis
  with pytest.raises(ValueError, match=r"quantize it with contract=\(-2,\)"):
    wrong.quantized_dot(jnp.ones((2, 32)), (((1,), (0,)), ((), ())), jnp.float32)
  # A quantized kernel of another model's shape: the float shape is checked, not the layout.
  module, _, batch, _ = _family("gpt_tied_scanned")
  q = quant_lib.quantize_params(params, "int8")
  head = q["embed"]["embedding"]
  q["embed"]["embedding"] = quantize(head.dequantize()[:, :-1], (-1,), 8, contract_last=True)
  with pytest.raises(ValueError, match=r"'embedding' of .* has shape \(64, 31\), the model "
                                       r"expects \(64, 32\); quantize a checkpoint of this"):
    apply_batch(module, q, batch)


@pytest.mark.parametrize("bits,last", [(8, False), (4, False), (8, True)])
def test_fused_quantized_kernels_equal_the_parts(bits, last):
  """Decoding's q/k/v (D, N, H) and gate/up (D, F) fusion of quantized kernels: the fused
  array dequantizes to the parts side by side, and its dot to their dots side by side."""
  rng = np.random.default_rng(bits)
  for shape, axis in (((256, 2, 8), 1), ((256, 24), 1)):
    parts = [quantize(jnp.asarray(rng.normal(size=shape), jnp.float32), (-len(shape),), bits,
                      contract_last=last) for _ in range(3)]
    fused = concatenate(parts, axis)
    np.testing.assert_array_equal(
        fused.dequantize(), np.concatenate([p.dequantize() for p in parts], axis=axis))
    x = jnp.asarray(rng.normal(size=(2, 256)), jnp.float32)
    dims = (((1,), (0,)), ((), ()))
    np.testing.assert_allclose(
        fused.quantized_dot(x, dims, jnp.float32),
        np.concatenate([p.quantized_dot(x, dims, jnp.float32) for p in parts], axis=axis),
        rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="must not be contracted"):
    concatenate(parts, 0)


def test_quantized_decode_fuses_qkv_and_matches_the_full_forward():
  module, params, _, _ = _family("gpt_tied_scanned")
  q = quant_lib.quantize_params(params, "int8")
  dec_module, dec_params = for_decoding(module, q)
  assert isinstance(dec_params["layers_0"]["attn"]["qkv"]["kernel"], QArray)
  tokens = np.array([[3, 4, 5, 6, 7, 8]], np.int32)
  state = prefill(dec_module, dec_params, jnp.asarray(tokens), jnp.asarray([6]), cache_len=8)
  want = module.apply({"params": q}, jnp.asarray(tokens))[0, -1]
  np.testing.assert_allclose(state.logits_BV[0], want, rtol=1e-4, atol=1e-4)
