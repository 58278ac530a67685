"""llm.convert: logits equal to Hugging Face transformers on the same random weights."""

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
from transformers import (DistilBertConfig, DistilBertModel, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM)

from llm.config import ModelConfig
from llm.convert import (from_transformers, load_pretrained, save_pretrained,
                         to_transformers)
from llm.models import build

ATOL = 1e-4
VOCAB = 1000

_GPT2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128,
             bos_token_id=0, eos_token_id=0)
_LLAMA = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=172, vocab_size=VOCAB, max_position_embeddings=128)

CASES = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(**_GPT2)),
    "gpt2_untied": lambda: GPT2LMHeadModel(GPT2Config(**_GPT2, tie_word_embeddings=False)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_LLAMA)),
    "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(**_LLAMA, tie_word_embeddings=True)),
    "llama_bias": lambda: LlamaForCausalLM(LlamaConfig(**_LLAMA, attention_bias=True,
                                                       mlp_bias=True, rope_parameters={
                                                           "rope_type": "default",
                                                           "rope_theta": 500.0})),
}


def _randomize(model, seed):
  """Scrambles every parameter, norms and biases included.

  HF initializes norm scales to 1 and biases to 0, which would hide a bias or norm
  mapped to the wrong place; std 0.1 keeps logits O(1) so atol 1e-4 is meaningful.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.1
      is_norm_scale = p.ndim == 1 and name.endswith("weight")
      p.copy_(noise + 1.0 if is_norm_scale else noise)
  return model.eval()


@pytest.fixture(scope="module")
def tokens():
  return np.random.RandomState(0).randint(0, VOCAB, size=(2, 24))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tokens):
  """(name, HF model, HF logits on `tokens`)."""
  torch.manual_seed(0)
  model = _randomize(CASES[request.param](), seed=1)
  return request.param, model, _hf_logits(model, tokens)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens)).logits.numpy()


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg):
  # One compiled program per config, shared across tests, beats op-by-op dispatch.
  return jax.jit(build(cfg).apply)


def _our_logits(cfg, params, tokens):
  return np.asarray(_jitted_apply(cfg)({"params": params}, jnp.asarray(tokens)))


def _assert_matches_init_tree(cfg, params, tokens):
  """Same tree, shapes and dtype (float32) as the module's own init."""
  shapes = jax.eval_shape(build(cfg).init, jax.random.key(0), jnp.asarray(tokens))
  expected = nn.unbox(shapes)["params"]
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
  jax.tree_util.tree_map(lambda p, e: _assert_leaf(p, e.shape), params, expected)


def _assert_leaf(p, shape):
  assert p.shape == shape and p.dtype == np.float32, (p.shape, shape, p.dtype)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers(case, tokens, scan_layers):
  name, model, want = case
  cfg, params = from_transformers(model, scan_layers=scan_layers)
  assert cfg.scan_layers == scan_layers and cfg.dropout == 0.0
  _assert_matches_init_tree(cfg, params, tokens)
  np.testing.assert_allclose(_our_logits(cfg, params, tokens), want, atol=ATOL, rtol=0)


def test_config_fields(case):
  name, model, _ = case
  cfg, _ = from_transformers(model)
  family = name.split("_")[0]
  expected = {
      "gpt2": dict(positions="learned", norm="layernorm", activation="gelu", use_bias=True,
                   num_kv_heads=4, max_len=128, d_ff=256,
                   tie_embeddings=name == "gpt2"),
      "llama": dict(positions="rope", norm="rmsnorm", activation="swiglu", num_kv_heads=2,
                    norm_eps=1e-6, max_len=128, d_ff=172,
                    use_bias=name == "llama_bias", tie_embeddings=name == "llama_tied",
                    rope_theta=500.0 if name == "llama_bias" else 10000.0),
  }[family]
  assert {k: getattr(cfg, k) for k in expected} == expected
  assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.dim_per_head) == (
      VOCAB, 64, 2, 4, 16)


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


def test_save_and_load_pretrained(case, tokens, tmp_path):
  name, model, want = case
  cfg, params = from_transformers(model, scan_layers=False)
  save_pretrained(cfg, params, tmp_path)
  assert os.path.exists(tmp_path / "model.safetensors")
  loaded_cfg, loaded = load_pretrained(tmp_path)
  assert loaded_cfg == dataclasses.replace(cfg, scan_layers=True)
  np.testing.assert_allclose(_our_logits(loaded_cfg, loaded, tokens), want, atol=ATOL, rtol=0)
  _, via_dir = from_transformers(str(tmp_path), scan_layers=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, via_dir, params)


@pytest.mark.parametrize("native, model_cls", [
    (dict(), GPT2LMHeadModel),
    (dict(positions="rope", norm="rmsnorm", activation="swiglu", num_kv_heads=2,
          use_bias=False, tie_embeddings=False), LlamaForCausalLM),
])
def test_llm_layout_params_to_transformers(native, model_cls, tokens):
  """The other direction: a boxed params tree in our own layout, not from an HF model."""
  cfg = ModelConfig(vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=4, d_ff=128,
                    max_len=32, **native)
  shapes = jax.eval_shape(build(cfg).init, jax.random.key(0), jnp.asarray(tokens))["params"]
  # Random values in the init's boxed tree (compiling the real init costs seconds).
  rng = np.random.RandomState(0)
  boxed = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
  model = to_transformers(cfg, boxed)
  assert type(model) is model_cls
  np.testing.assert_allclose(_hf_logits(model, tokens), _our_logits(cfg, nn.unbox(boxed), tokens),
                             atol=ATOL, rtol=0)


def _tiny_distilbert():
  return DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2,
                                          hidden_dim=37))


def test_unsupported_model_type(tmp_path):
  model = _tiny_distilbert()
  match = (r"model_type='distilbert' is not supported; supported model types: "
           r"gpt2, llama, bert, roberta, bloom, mixtral, t5, bart")
  with pytest.raises(ValueError, match=match):
    from_transformers(model)
  model.save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=match):
    load_pretrained(tmp_path)


_ONE_LAYER_GPT2 = {**_GPT2, "n_layer": 1}
_ONE_LAYER_LLAMA = {**_LLAMA, "num_hidden_layers": 1}


@pytest.mark.parametrize("make, field", [
    (lambda: GPT2LMHeadModel(GPT2Config(**_ONE_LAYER_GPT2, scale_attn_by_inverse_layer_idx=True)),
     "scale_attn_by_inverse_layer_idx"),
    (lambda: GPT2LMHeadModel(GPT2Config(**_ONE_LAYER_GPT2, scale_attn_weights=False)),
     "scale_attn_weights"),
    (lambda: GPT2LMHeadModel(GPT2Config(**_ONE_LAYER_GPT2, activation_function="gelu_fast")),
     "activation_function"),
    (lambda: LlamaForCausalLM(LlamaConfig(**_ONE_LAYER_LLAMA, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})), "rope_parameters"),
    (lambda: LlamaForCausalLM(LlamaConfig(**_ONE_LAYER_LLAMA, attention_bias=True)),
     "attention_bias"),
    (lambda: LlamaForCausalLM(LlamaConfig(**_ONE_LAYER_LLAMA, hidden_act="gelu")), "hidden_act"),
])
def test_unsupported_config_feature_names_field(make, field):
  with pytest.raises(ValueError, match=rf"config\.{field}"):
    from_transformers(make())


def test_to_transformers_rejects_inexpressible_config():
  cfg = ModelConfig(vocab_size=VOCAB, d_model=64, num_heads=4, d_ff=128, positions="none")
  params = {}  # never reached: the config is checked first
  with pytest.raises(ValueError, match=r"gpt2: positions='none'.*llama: positions='none'"):
    to_transformers(cfg, params)
  with pytest.raises(ValueError, match=r"gpt2 cannot express config.model: .*norm='rmsnorm'"):
    to_transformers(ModelConfig(norm="rmsnorm"), params, model_type="gpt2")


def test_checkpoint_with_unmapped_tensor_is_rejected():
  model = GPT2LMHeadModel(GPT2Config(**_ONE_LAYER_GPT2))
  model.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
  with pytest.raises(ValueError, match="no llm counterpart: extra"):
    from_transformers(model)
