"""llm.convert for BLOOM (ALiBi, embedding LayerNorm, fused per-head qkv) and Mixtral (MoE):
logits equal to Hugging Face transformers on the same random weights."""

import dataclasses
import functools
import os

# Conversion must never reach the hub; set before transformers reads its env.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, MixtralConfig, MixtralForCausalLM

from llm.config import ModelConfig, MoEConfig
from llm.convert import (from_transformers, load_pretrained, save_pretrained,
                         to_transformers)
from llm.convert import mixtral as mixtral_family
from llm.convert.common import torch_state_to_numpy
from llm.layers.moe import collect_moe_stats
from llm.layers.position import alibi_slopes
from llm.models import build

ATOL = 1e-4
VOCAB = 1000
B, T = 2, 24

_BLOOM = dict(n_layer=2, hidden_size=64, n_head=4, vocab_size=VOCAB)
_MIXTRAL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=128)

CASES = {
    "bloom": lambda: BloomForCausalLM(BloomConfig(**_BLOOM)),
    # 6 heads: not a power of two, so the interleaved extra slopes are used.
    "bloom_6heads_untied": lambda: BloomForCausalLM(BloomConfig(
        **{**_BLOOM, "hidden_size": 96, "n_head": 6}, tie_word_embeddings=False,
        seq_length=512)),
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**_MIXTRAL)),
}


def _randomize(model, seed):
  """Scrambles every parameter, norms and biases included (HF's 1 / 0 init hides swaps)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.1
      is_norm_scale = p.ndim == 1 and name.endswith("weight")
      p.copy_(noise + 1.0 if is_norm_scale else noise)
  return model.eval()


@pytest.fixture(scope="module")
def tokens():
  return np.random.RandomState(0).randint(0, VOCAB, size=(B, T))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tokens):
  """(name, HF model, HF logits on `tokens`)."""
  torch.manual_seed(0)
  model = _randomize(CASES[request.param](), seed=1)
  return request.param, model, _hf_logits(model, tokens)


def _hf_logits(model, tokens, attention_mask=None):
  with torch.no_grad():
    mask = None if attention_mask is None else torch.from_numpy(attention_mask)
    return model(torch.from_numpy(tokens), attention_mask=mask).logits.numpy()


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg):
  # One compiled program per config; eager Flax is far slower than compiling.
  return jax.jit(build(cfg).apply)


def _our_logits(cfg, params, tokens, segment_ids=None):
  seg = None if segment_ids is None else jnp.asarray(segment_ids)
  return np.asarray(_jitted_apply(cfg)({"params": params}, jnp.asarray(tokens),
                                       segment_ids_BT=seg))


def _assert_matches_init_tree(cfg, params, tokens):
  shapes = jax.eval_shape(build(cfg).init, jax.random.key(0), jnp.asarray(tokens))
  expected = nn.unbox(shapes)["params"]
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
  jax.tree_util.tree_map(
      lambda p, e: (p.shape, p.dtype) == (e.shape, np.float32) or pytest.fail(
          f"{p.shape} {p.dtype} != {e.shape} float32"), params, expected)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers(case, tokens, scan_layers):
  name, model, want = case
  cfg, params = from_transformers(model, scan_layers=scan_layers)
  assert cfg.scan_layers == scan_layers and cfg.dropout == 0.0
  _assert_matches_init_tree(cfg, params, tokens)
  got = _our_logits(cfg, params, tokens)
  print(f"{name} scan={scan_layers}: max |ours - HF| = {np.max(np.abs(got - want)):.2e}")
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_config_fields(case):
  name, model, _ = case
  cfg, _ = from_transformers(model)
  if name.startswith("bloom"):
    d = model.config.hidden_size
    expected = dict(positions="alibi", embed_norm=True, norm="layernorm", activation="gelu",
                    use_bias=True, num_kv_heads=model.config.n_head, d_ff=4 * d, d_model=d,
                    max_len=512 if name == "bloom_6heads_untied" else 2048,
                    tie_embeddings=name == "bloom", post_norm=False, moe=MoEConfig())
  else:
    expected = dict(positions="rope", norm="rmsnorm", activation="swiglu", use_bias=False,
                    num_kv_heads=2, d_ff=96, max_len=128, tie_embeddings=False,
                    rope_theta=1e6, norm_eps=1e-5,
                    moe=MoEConfig(num_experts=4, top_k=2, every=1, capacity_factor=2.0,
                                  aux_loss_weight=0.001, z_loss_weight=0.0, renormalize=True))
  assert {k: getattr(cfg, k) for k in expected} == expected


def test_alibi_slopes_match_transformers():
  from transformers.models.bloom.modeling_bloom import _get_alibi_slopes
  for n in (1, 4, 6, 12, 16, 24):
    np.testing.assert_allclose(np.asarray(alibi_slopes(n)),
                               _get_alibi_slopes(n, torch.device("cpu")).numpy(), rtol=1e-6)


def test_to_transformers_round_trip(case, tokens):
  name, model, want = case
  cfg, params = from_transformers(model, scan_layers=True)
  back = to_transformers(cfg, params)
  assert type(back) is type(model) and not back.training
  theirs, ours = model.state_dict(), back.state_dict()
  assert sorted(theirs) == sorted(ours)
  for key in theirs:
    torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
  np.testing.assert_allclose(_hf_logits(back, tokens), want, atol=ATOL, rtol=0)
  assert from_transformers(back)[0] == cfg


def test_save_and_load_pretrained(case, tokens, tmp_path):
  name, model, want = case
  cfg, params = from_transformers(model, scan_layers=False)
  save_pretrained(cfg, params, tmp_path)
  loaded_cfg, loaded = load_pretrained(tmp_path)  # Mixtral: HF writes per-expert w1/w2/w3
  assert loaded_cfg == dataclasses.replace(cfg, scan_layers=True)
  np.testing.assert_allclose(_our_logits(loaded_cfg, loaded, tokens), want, atol=ATOL, rtol=0)
  _, via_dir = from_transformers(str(tmp_path), scan_layers=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, via_dir, params)


def test_bloom_left_padding_matches_attention_mask(tokens):
  """HF builds ALiBi from the cumulative attention mask; ours from key slots with padding
  masked out by segment ids. Equal (softmax-invariant shift) on every real position."""
  torch.manual_seed(0)
  model = _randomize(CASES["bloom_6heads_untied"](), seed=2)
  mask = np.ones((B, T), np.int64)
  mask[0, :7] = 0  # row 0 left-padded by 7, row 1 not padded
  padded = np.where(mask == 1, tokens, 3)
  want = _hf_logits(model, padded, attention_mask=mask)
  cfg, params = from_transformers(model, scan_layers=True)
  got = _our_logits(cfg, params, padded, segment_ids=mask.astype(np.int32))
  real = mask == 1
  print(f"bloom left padding: max |ours - HF| = {np.max(np.abs(got[real] - want[real])):.2e}")
  np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0)
  # And the padded row's real tokens equal the same tokens unpadded.
  alone = _our_logits(cfg, params, padded[:1, 7:])
  np.testing.assert_allclose(got[0, 7:], alone[0], atol=ATOL, rtol=0)


def test_bloom_pretraining_tp_without_slow_but_exact_is_plain(tokens):
  """pretraining_tp only matters with slow_but_exact; alone it leaves the math unchanged."""
  torch.manual_seed(0)
  model = _randomize(BloomForCausalLM(BloomConfig(**_BLOOM, pretraining_tp=2)), seed=1)
  cfg, params = from_transformers(model)
  np.testing.assert_allclose(_our_logits(cfg, params, tokens), _hf_logits(model, tokens),
                             atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def mixtral():
  """(HF Mixtral, cfg, params) with the same weights as the "mixtral" case."""
  torch.manual_seed(0)
  model = _randomize(CASES["mixtral"](), seed=1)
  return (model, *from_transformers(model))


def test_mixtral_per_expert_state_layout(mixtral):
  """transformers 4 / on-disk names (block_sparse_moe.experts.{e}.w1/w3/w2) read the same."""
  model, cfg, params = mixtral
  legacy = {}
  for key, value in torch_state_to_numpy(model.state_dict()).items():
    p = key.replace(".mlp.experts.gate_up_proj", "").replace(".mlp.experts.down_proj", "")
    p += ".block_sparse_moe.experts"
    if key.endswith(".mlp.experts.gate_up_proj"):  # (E, 2F, D) = [w1; w3]
      f = value.shape[1] // 2
      for e in range(value.shape[0]):
        legacy[f"{p}.{e}.w1.weight"], legacy[f"{p}.{e}.w3.weight"] = value[e, :f], value[e, f:]
    elif key.endswith(".mlp.experts.down_proj"):  # (E, D, F)
      for e in range(value.shape[0]):
        legacy[f"{p}.{e}.w2.weight"] = value[e]
    else:
      legacy[key.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = value
  assert not any(".mlp." in k for k in legacy)
  from_legacy = mixtral_family.params_from_hf(legacy, cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_legacy, params)


def test_mixtral_routes_without_drops(mixtral, tokens):
  """capacity_factor = E / k gives every expert the whole row: HF never drops either."""
  _, cfg, params = mixtral
  apply = jax.jit(functools.partial(build(cfg).apply, mutable=["moe_stats"]))
  _, state = apply({"params": params}, jnp.asarray(tokens))
  assert float(collect_moe_stats(state["moe_stats"])["dropped_fraction"]) == 0.0


def _one_layer_bloom(**kw):
  return BloomForCausalLM(BloomConfig(**{**_BLOOM, "n_layer": 1}, **kw))


def _one_layer_mixtral(**kw):
  return MixtralForCausalLM(MixtralConfig(**{**_MIXTRAL, "num_hidden_layers": 1}, **kw))


@pytest.mark.parametrize("make, field", [
    (lambda: _one_layer_bloom(apply_residual_connection_post_layernorm=True),
     "apply_residual_connection_post_layernorm"),
    (lambda: _one_layer_bloom(pretraining_tp=2, slow_but_exact=True), "slow_but_exact"),
    (lambda: _one_layer_mixtral(sliding_window=16), "sliding_window"),
    (lambda: _one_layer_mixtral(hidden_act="relu"), "hidden_act"),
    (lambda: _one_layer_mixtral(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                 "rope_theta": 1e4}), "rope_parameters"),
])
def test_unsupported_config_feature_names_field(make, field):
  with pytest.raises(ValueError, match=rf"config\.{field}"):
    from_transformers(make())


def test_mixtral_sliding_window_that_never_binds_is_accepted():
  cfg, _ = from_transformers(_one_layer_mixtral(sliding_window=128))
  assert cfg.moe.num_experts == 4


def _native_moe_cfg(**moe):
  return ModelConfig(vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     d_ff=96, max_len=64, positions="rope", norm="rmsnorm",
                     activation="swiglu", use_bias=False, tie_embeddings=False,
                     moe=MoEConfig(num_experts=4, top_k=2, **moe))


def _random_params(cfg, tokens):
  shapes = jax.eval_shape(build(cfg).init, jax.random.key(0), jnp.asarray(tokens))["params"]
  rng = np.random.RandomState(0)
  return jax.tree_util.tree_map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32),
                                shapes)


@pytest.mark.parametrize("native, model_cls", [
    (dict(positions="alibi", embed_norm=True, d_ff=256), BloomForCausalLM),
    (dict(positions="rope", norm="rmsnorm", activation="swiglu", num_kv_heads=2,
          use_bias=False, tie_embeddings=False, d_ff=96,
          moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=2.0)), MixtralForCausalLM),
])
def test_llm_layout_params_to_transformers(native, model_cls, tokens):
  """The other direction: a boxed params tree in our own layout picks the right family."""
  cfg = ModelConfig(vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=4, max_len=32,
                    **native)
  boxed = _random_params(cfg, tokens)
  model = to_transformers(cfg, boxed)
  assert type(model) is model_cls
  np.testing.assert_allclose(_hf_logits(model, tokens),
                             _our_logits(cfg, nn.unbox(boxed), tokens), atol=ATOL, rtol=0)


def test_to_transformers_rejects_dropping_moe():
  params = {}  # never reached: the config is checked first
  with pytest.raises(ValueError, match=r"mixtral cannot express .*capacity_factor=1.25"):
    to_transformers(_native_moe_cfg(capacity_factor=1.25), params, model_type="mixtral")
  with pytest.raises(ValueError, match=r"mixtral: .*capacity_factor=1.25"):
    to_transformers(_native_moe_cfg(capacity_factor=1.25), params)
  with pytest.raises(ValueError, match=r"bloom cannot express .*moe.num_experts=4"):
    to_transformers(_native_moe_cfg(capacity_factor=2.0), params, model_type="bloom")
