"""llm.convert for encoder-decoders (T5 v1.0 / v1.1, BART): logits equal to Hugging Face
transformers on the same random weights, with a padded encoder batch."""

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
from transformers import (BartConfig, BartForConditionalGeneration, T5Config,
                          T5ForConditionalGeneration)

from llm.config import ModelConfig
from llm.convert import from_transformers, load_pretrained, save_pretrained, to_transformers
from llm.models import build

ATOL = 1e-4
VOCAB = 120
B, S, T = 3, 12, 7

_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
           relative_attention_num_buckets=8, relative_attention_max_distance=16)
_BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=1,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
             decoder_ffn_dim=64, max_position_embeddings=32)


def _untie_t5_head(model):
  """A v1.1 checkpoint's own lm_head (transformers 5 ties it on construction and unties it
  in from_pretrained when the checkpoint's head differs from `shared`)."""
  model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
  model.all_tied_weights_keys.pop("lm_head.weight", None)
  return model


def _untie_bart_head(model):
  """tie_word_embeddings=False unties the stacks' embeddings too; ours share one table."""
  model.model.encoder.embed_tokens.weight = model.model.shared.weight
  model.model.decoder.embed_tokens.weight = model.model.shared.weight
  return model


CASES = {
    # v1.0: relu, lm_head tied to `shared` with the d_model**-0.5 rescale.
    "t5": lambda: T5ForConditionalGeneration(T5Config(**_T5)),
    # v1.1: gated GELU, untied head, d_kv * heads (48) != d_model (32), deeper decoder.
    "t5_v1_1": lambda: _untie_t5_head(T5ForConditionalGeneration(T5Config(
        **{**_T5, "d_kv": 12}, num_decoder_layers=3, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, layer_norm_epsilon=1e-5))),
    "bart": lambda: BartForConditionalGeneration(BartConfig(**_BART)),
    "bart_untied_relu": lambda: _untie_bart_head(BartForConditionalGeneration(BartConfig(
        **_BART, activation_function="relu", tie_word_embeddings=False))),
}


def _randomize(model, seed):
  """Scrambles every parameter, norms and biases included (HF's 1 / 0 init hides swaps)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.1
      is_norm_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
      p.copy_(noise + 1.0 if is_norm_scale else noise)
  return model.eval()


def _inputs(name, seed=0):
  """Encoder tokens, attention mask (a full row, a right-padded row, and for T5 a
  left-padded row: BART's positions ignore padding, see llm/convert/bart.py), decoder
  tokens."""
  rng = np.random.RandomState(seed)
  mask = np.ones((B, S), np.int64)
  mask[1, -4:] = 0
  if name.startswith("t5"):
    mask[2, :3] = 0
  else:
    mask[2, -1:] = 0
  pad = 0 if name.startswith("t5") else 1
  encoder = np.where(mask == 1, rng.randint(3, VOCAB, size=(B, S)), pad)
  return encoder, mask, rng.randint(3, VOCAB, size=(B, T))


def _torch(x):
  return torch.from_numpy(np.asarray(x))


def _hf_logits(model, encoder, mask, decoder):
  with torch.no_grad():
    return model(input_ids=_torch(encoder), attention_mask=_torch(mask),
                 decoder_input_ids=_torch(decoder)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
  """(name, HF model, (encoder tokens, mask, decoder tokens), HF logits)."""
  name = request.param
  torch.manual_seed(0)
  model = _randomize(CASES[name](), seed=1)
  inputs = _inputs(name)
  return name, model, inputs, _hf_logits(model, *inputs)


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg):
  # Eager Flax dispatches op by op; one compiled program per config is much faster.
  return jax.jit(build(cfg).apply)


def _our_logits(cfg, params, encoder, mask, decoder):
  return np.asarray(_jitted_apply(cfg)({"params": params}, jnp.asarray(encoder),
                                       jnp.asarray(decoder),
                                       encoder_segment_ids_BS=jnp.asarray(mask)))


def _assert_same_params(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers(case, scan_layers):
  name, model, (encoder, mask, decoder), want = case
  cfg, params = from_transformers(model, scan_layers=scan_layers)
  assert cfg.scan_layers == scan_layers
  got = _our_logits(cfg, params, encoder, mask, decoder)
  diff = np.abs(got - want)
  # Decoder rows attend to real encoder tokens only, so every logit must match.
  assert diff.max() < ATOL, f"{name}: max abs diff {diff.max():.2e}"
  shapes = jax.eval_shape(build(cfg).init, jax.random.key(0), jnp.asarray(encoder),
                          jnp.asarray(decoder))
  expected = nn.unbox(shapes)["params"]
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
  jax.tree_util.tree_map(lambda p, e: (p.shape, p.dtype) == (e.shape, np.float32) or
                         pytest.fail(f"{p.shape} {p.dtype} vs {e.shape}"), params, expected)


def test_config_fields(case):
  name, model, _, _ = case
  cfg, params = from_transformers(model)
  assert cfg.family == "encoder_decoder"
  if name.startswith("t5"):
    assert (cfg.positions, cfg.norm, cfg.use_bias, cfg.scale_attention, cfg.post_norm,
            cfg.relative_buckets, cfg.relative_max_distance, cfg.max_len) == (
                "relative", "rmsnorm", False, False, False, 8, 16, 512)
    if name == "t5":
      assert (cfg.activation, cfg.tie_embeddings, cfg.head_dim, cfg.norm_eps,
              cfg.num_decoder_layers) == ("relu", True, 8, 1e-6, 2)
      assert "lm_head" not in params
    else:
      assert (cfg.activation, cfg.tie_embeddings, cfg.head_dim, cfg.norm_eps,
              cfg.num_decoder_layers) == ("geglu", False, 12, 1e-5, 3)
      np.testing.assert_array_equal(params["lm_head"]["kernel"],
                                    model.lm_head.weight.detach().numpy().T)
  else:
    assert (cfg.positions, cfg.position_offset, cfg.max_len, cfg.norm, cfg.norm_eps,
            cfg.use_bias, cfg.scale_attention, cfg.post_norm, cfg.embed_norm, cfg.num_layers,
            cfg.num_decoder_layers) == ("learned", 2, 32, "layernorm", 1e-5, True, True, True,
                                        True, 2, 1)
    assert (cfg.activation, cfg.tie_embeddings) == (
        ("gelu_exact", True) if name == "bart" else ("relu", False))


def test_to_transformers_round_trip(case):
  name, model, inputs, want = case
  cfg, params = from_transformers(model)
  back = to_transformers(cfg, params)
  assert type(back) is type(model) and back.config.model_type == name.split("_")[0]
  np.testing.assert_allclose(_hf_logits(back, *inputs), want, atol=1e-6, rtol=0)
  cfg2, params2 = from_transformers(back)
  assert cfg2 == cfg
  _assert_same_params(params2, params)


def test_save_and_load_pretrained(case, tmp_path):
  name, model, inputs, want = case
  cfg, params = from_transformers(model, scan_layers=False)
  save_pretrained(cfg, params, tmp_path)
  cfg2, params2 = load_pretrained(tmp_path, scan_layers=False)
  assert cfg2 == cfg
  _assert_same_params(params2, params)
  # transformers reads it back too (an untied T5 head stays untied).
  reloaded = type(model).from_pretrained(tmp_path, local_files_only=True).eval()
  np.testing.assert_allclose(_hf_logits(reloaded, *inputs), want, atol=1e-6, rtol=0)


def test_to_transformers_picks_the_family():
  t5_cfg = ModelConfig(family="encoder_decoder", vocab_size=VOCAB, d_model=32, num_heads=4,
                       d_ff=64, num_layers=1, positions="relative", norm="rmsnorm",
                       use_bias=False, scale_attention=False, activation="swiglu")
  shapes = jax.eval_shape(build(t5_cfg).init, jax.random.key(0), jnp.ones((1, 4), jnp.int32),
                          jnp.ones((1, 3), jnp.int32))
  params = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, np.float32),
                                  nn.unbox(shapes)["params"])
  assert to_transformers(t5_cfg, params).config.model_type == "t5"
  with pytest.raises(ValueError, match=r"t5: positions='rope'.*bart: positions='rope'"):
    to_transformers(ModelConfig(family="encoder_decoder", positions="rope"), {})
  with pytest.raises(ValueError, match=r"bart cannot express config.model: .*norm_eps=1e-06"):
    to_transformers(ModelConfig(family="encoder_decoder", position_offset=2, post_norm=True,
                                embed_norm=True, norm_eps=1e-6), {}, model_type="bart")


_ONE_LAYER_BART = {**_BART, "encoder_layers": 1}


@pytest.mark.parametrize("make, field", [
    (lambda: BartForConditionalGeneration(BartConfig(**_ONE_LAYER_BART, scale_embedding=True)),
     "scale_embedding"),
    (lambda: BartForConditionalGeneration(BartConfig(**{**_ONE_LAYER_BART,
                                                        "decoder_attention_heads": 2})),
     "decoder_attention_heads"),
    (lambda: BartForConditionalGeneration(BartConfig(**{**_ONE_LAYER_BART,
                                                        "decoder_ffn_dim": 48})),
     "decoder_ffn_dim"),
    (lambda: BartForConditionalGeneration(BartConfig(**_ONE_LAYER_BART,
                                                     activation_function="silu")),
     "activation_function"),
    (lambda: T5ForConditionalGeneration(T5Config(**{**_T5, "num_layers": 1},
                                                 feed_forward_proj="gated-relu")),
     "feed_forward_proj"),
])
def test_unsupported_config_feature_names_field(make, field):
  with pytest.raises(ValueError, match=rf"config\.{field}"):
    from_transformers(make())


def test_inexpressible_weights_are_rejected():
  bart = BartForConditionalGeneration(BartConfig(**_ONE_LAYER_BART))
  with torch.no_grad():
    bart.final_logits_bias[0, 5] = 1.0
  with pytest.raises(ValueError, match="final_logits_bias is non-zero"):
    from_transformers(bart)
  # Untied BART embeddings that really differ between the stacks.
  untied = _randomize(BartForConditionalGeneration(BartConfig(**_ONE_LAYER_BART,
                                                              tie_word_embeddings=False)), 0)
  with pytest.raises(ValueError, match="one token embedding for both stacks"):
    from_transformers(untied)
  # A T5 v1.0 (rescaled, tied) head whose weights differ from `shared`.
  t5 = _untie_t5_head(T5ForConditionalGeneration(T5Config(**{**_T5, "num_layers": 1})))
  _randomize(t5, 0)
  with pytest.raises(ValueError, match="lm_head.weight differs from shared.weight"):
    from_transformers(t5)
