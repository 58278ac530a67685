"""llm.convert's tables and safe reading, without compiling a model: every field a family
cannot express is refused naming it, every carried field survives a round trip through the
HF config, every param is consumed on export, and checkpoint directories load only
safetensors (unless pickles are allowed) from shards inside the directory."""

import dataclasses
import json
import os
import re

# Conversion must never reach the hub; set before transformers reads its env.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from llm.config import ModelConfig, MoEConfig
from llm.convert import (FAMILIES, ConversionError, from_transformers, load_pretrained,
                         table, to_transformers)
from llm.layers.mlp import ACTIVATIONS
from llm.train import init_from

VOCAB = 1000

# An expressible config per family, and (by hand, from each family's architecture) every
# field it fixes or constrains, with a value it cannot express.
BASE = {
    "gpt2": ModelConfig(vocab_size=VOCAB, d_model=64, num_heads=4, d_ff=128, max_len=32),
    "llama": ModelConfig(vocab_size=VOCAB, d_model=64, num_heads=4, num_kv_heads=2, d_ff=96,
                         max_len=32, positions="rope", norm="rmsnorm", activation="swiglu",
                         use_bias=False, tie_embeddings=False),
    "bloom": ModelConfig(vocab_size=VOCAB, d_model=64, num_heads=4, d_ff=256, max_len=32,
                         positions="alibi", embed_norm=True),
    "mixtral": ModelConfig(vocab_size=VOCAB, d_model=64, num_heads=4, num_kv_heads=2, d_ff=96,
                           max_len=32, positions="rope", norm="rmsnorm", activation="swiglu",
                           use_bias=False, tie_embeddings=False,
                           moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=2.0)),
    "bert": ModelConfig(family="encoder", vocab_size=VOCAB, d_model=64, num_heads=4, d_ff=128,
                        max_len=32, post_norm=True, embed_norm=True, type_vocab_size=2,
                        activation="gelu_exact"),
    "roberta": ModelConfig(family="encoder", vocab_size=VOCAB, d_model=64, num_heads=4,
                           d_ff=128, max_len=32, post_norm=True, embed_norm=True,
                           type_vocab_size=1, position_offset=2, activation="gelu_exact"),
    "t5": ModelConfig(family="encoder_decoder", vocab_size=VOCAB, d_model=32, num_layers=1,
                      num_heads=4, d_ff=64, positions="relative", norm="rmsnorm",
                      use_bias=False, scale_attention=False, activation="swiglu"),
    "bart": ModelConfig(family="encoder_decoder", vocab_size=VOCAB, d_model=32, num_layers=1,
                        num_heads=4, d_ff=64, max_len=32, position_offset=2, post_norm=True,
                        embed_norm=True, activation="gelu_exact"),
}
_DECODER = {"family": "encoder", "post_norm": True, "embed_norm": True,
            "scale_attention": False, "peft.method": "lora"}
_ENCODER = {"family": "decoder", "positions": "rope", "norm": "rmsnorm", "post_norm": False,
            "embed_norm": False, "use_bias": False, "scale_attention": False,
            "moe.num_experts": 4, "activation": "swiglu", "num_kv_heads": 2, "head_dim": 32,
            "type_vocab_size": 0, "peft.method": "lora"}
REFUSED = {
    "gpt2": {**_DECODER, "positions": "rope", "norm": "rmsnorm", "use_bias": False,
             "embed_norm": True, "moe.num_experts": 4, "activation": "swiglu",
             "num_kv_heads": 2, "head_dim": 32},
    "llama": {**_DECODER, "positions": "learned", "norm": "layernorm", "moe.num_experts": 4,
              "activation": "gelu", "d_model": 66},
    "bloom": {**_DECODER, "positions": "learned", "embed_norm": False, "norm": "rmsnorm",
              "use_bias": False, "activation": "relu", "moe.num_experts": 4,
              "num_kv_heads": 2, "head_dim": 32, "d_ff": 128},
    "mixtral": {**_DECODER, "positions": "learned", "norm": "layernorm", "use_bias": True,
                "activation": "gelu", "moe.num_experts": 0, "moe.every": 2,
                "moe.renormalize": False, "moe.capacity_factor": 1.25},
    "bert": {**_ENCODER, "position_offset": 2},
    "roberta": {**_ENCODER, "position_offset": 0},
    "t5": {"family": "decoder", "positions": "learned", "norm": "layernorm", "post_norm": True,
           "embed_norm": True, "use_bias": True, "scale_attention": True, "moe.num_experts": 4,
           "num_kv_heads": 2, "peft.method": "lora"},
    "bart": {"family": "decoder", "positions": "relative", "position_offset": 0,
             "norm": "rmsnorm", "norm_eps": 1e-6, "post_norm": False, "embed_norm": False,
             "use_bias": False, "scale_attention": False, "moe.num_experts": 4,
             "activation": "swiglu", "num_kv_heads": 2, "head_dim": 16, "peft.method": "lora"},
}
CASES = [(mt, field, bad) for mt, fields in REFUSED.items() for field, bad in fields.items()]


def test_every_family_has_a_case_and_a_complete_table():
  assert sorted(BASE) == sorted(REFUSED) == sorted(FAMILIES)
  for mt, family in FAMILIES.items():
    assert table.table_errors(family.FIELDS) == [], mt
    assert table.problems(mt, family.FIELDS, BASE[mt]) == [], mt
    # Each field the table fixes or constrains has a refusal case above; an allowed field
    # without one must allow every activation (t5).
    fields = family.FIELDS
    constrained = {*fields.fixed, *(r.field for r in (*table.COMMON_RULES, *fields.rules))}
    assert constrained <= set(REFUSED[mt]), (mt, constrained - set(REFUSED[mt]))
    for name in set(fields.allowed) - set(REFUSED[mt]):
      assert name == "activation" and set(fields.allowed[name]) == set(ACTIVATIONS), (mt, name)
  # A table that forgets a field (here: the drift that let embed_norm through) is caught.
  fields = FAMILIES["gpt2"].FIELDS
  fixed = {k: v for k, v in fields.fixed.items() if k != "embed_norm"}
  assert table.table_errors(dataclasses.replace(fields, fixed=fixed)) == [
      "says nothing about embed_norm"]


@pytest.mark.parametrize("model_type, field, bad", CASES, ids=[f"{m}-{f}" for m, f, _ in CASES])
def test_inexpressible_field_is_refused_naming_it(model_type, field, bad):
  cfg = table.with_fields(BASE[model_type], {field: bad})
  with pytest.raises(ConversionError) as e:
    to_transformers(cfg, {}, model_type=model_type)  # params are never reached
  message = str(e.value)
  assert "\n" not in message and message.startswith(model_type), message
  # Exactly this field is named, with the value it has.
  assert re.search(rf"(^|[ .]){re.escape(f'{field}={bad!r}')}", message), message
  if field != "family":
    assert table.problems(model_type, FAMILIES[model_type].FIELDS, cfg) == [
        message.split(": ", 1)[1]]


def test_decoder_with_embedding_norm_is_refused_by_every_decoder_family():
  """The issue's case: a learned-position LayerNorm decoder with embed_norm=True used to
  export as GPT-2 without a word (logits then differ by up to 1.96)."""
  with pytest.raises(ConversionError) as e:
    to_transformers(ModelConfig(embed_norm=True), {})
  message = str(e.value)
  assert message.startswith("no transformers family expresses config.model: gpt2: "
                            "embed_norm=True (needs False) | llama: "), message
  assert "mixtral: " in message and "bloom: positions='learned'" in message


# Every carried field, away from its default, survives config_to_hf -> config_from_hf.
RICH = {
    "gpt2": dict(vocab_size=VOCAB, d_model=48, num_layers=3, num_heads=6, d_ff=100,
                 max_len=40, norm_eps=1e-6, tie_embeddings=False, activation="relu"),
    "llama": dict(vocab_size=VOCAB, d_model=64, num_layers=3, num_heads=8, num_kv_heads=2,
                  head_dim=12, d_ff=100, max_len=40, rope_theta=500.0, norm_eps=1e-6,
                  use_bias=False, tie_embeddings=False, activation="geglu"),
    "bloom": dict(vocab_size=VOCAB, d_model=48, num_layers=3, num_heads=6, d_ff=192,
                  max_len=40, norm_eps=1e-6, tie_embeddings=False),
    "mixtral": dict(vocab_size=VOCAB, d_model=64, num_layers=3, num_heads=8, num_kv_heads=2,
                    head_dim=12, d_ff=100, max_len=40, rope_theta=500.0, norm_eps=1e-6,
                    tie_embeddings=False, activation="geglu",
                    moe=MoEConfig(num_experts=4, top_k=1, capacity_factor=4.0,
                                  aux_loss_weight=0.02, z_loss_weight=0.0)),
    "bert": dict(vocab_size=VOCAB, d_model=48, num_layers=3, num_heads=6, d_ff=100,
                 max_len=40, norm_eps=1e-6, type_vocab_size=3, activation="relu"),
    "roberta": dict(vocab_size=VOCAB, d_model=48, num_layers=3, num_heads=6, d_ff=100,
                    max_len=40, norm_eps=1e-6, type_vocab_size=3, position_offset=3,
                    activation="gelu"),
    "t5": dict(vocab_size=VOCAB, d_model=48, num_layers=3, num_decoder_layers=2, num_heads=6,
               head_dim=12, d_ff=100, relative_buckets=16, relative_max_distance=64,
               norm_eps=1e-6, tie_embeddings=False, activation="geglu"),
    "bart": dict(vocab_size=VOCAB, d_model=48, num_layers=3, num_decoder_layers=2,
                 num_heads=6, d_ff=100, max_len=40, tie_embeddings=False, activation="relu"),
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_carried_and_allowed_fields_survive_the_hf_config(model_type):
  family, default = FAMILIES[model_type], ModelConfig()
  fields = family.FIELDS
  cfg = table.with_fields(BASE[model_type], RICH[model_type])
  assert table.problems(model_type, fields, cfg) == []
  kept = [*fields.carried, *fields.fixed, *fields.allowed]
  for name in fields.carried:  # else the round trip would not show the field is carried
    assert table.field_value(cfg, name) != table.field_value(default, name), name
  variants = [cfg] + [dataclasses.replace(cfg, activation=a)
                      for a in fields.allowed.get("activation", ())]
  for want in variants:
    back = family.config_from_hf(family.config_to_hf(want), scan_layers=True)
    assert ({n: table.field_value(back, n) for n in kept} ==
            {n: table.field_value(want, n) for n in kept})


# Export consumes every param: GPT-2 weights converted from a tiny torch model (no compile).

_GPT2 = dict(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
             eos_token_id=0)


@pytest.fixture(scope="module")
def gpt2():
  torch.manual_seed(0)
  model = GPT2LMHeadModel(GPT2Config(**_GPT2)).eval()
  return (model, *from_transformers(model))


def test_every_param_is_consumed_on_export(gpt2):
  model, cfg, params = gpt2
  extra = {**params, "layers": {**params["layers"], "attn": {
      **params["layers"]["attn"], "query": {**params["layers"]["attn"]["query"],
                                            "lora_a": np.zeros((2, 16, 4), np.float32)}}}}
  with pytest.raises(ConversionError, match=r"gpt2 has no place for params "
                     r"layers_0/attn/query/lora_a, layers_1/attn/query/lora_a: exporting "
                     r"would drop them"):
    to_transformers(cfg, extra)
  with pytest.raises(ConversionError, match=r"gpt2 has no place for params classifier"):
    to_transformers(cfg, {**params, "classifier": {}})
  # A stack deeper than the config says (its last block would be dropped).
  deeper = dataclasses.replace(cfg, num_layers=1)
  with pytest.raises(ConversionError, match=r"no place for params layers_1/attn/key/bias, "
                     r"layers_1/attn/key/kernel, .* \.\.\.: exporting would drop them"):
    to_transformers(deeper, params)
  lacking = {k: v for k, v in params.items() if k != "final_norm"}
  with pytest.raises(ConversionError, match=r"params lack 'final_norm/scale', which gpt2 needs"):
    to_transformers(cfg, lacking)
  # And the full tree round-trips exactly.
  back = to_transformers(cfg, params)
  for key, value in model.state_dict().items():
    torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_tied_copies_that_differ_are_refused(gpt2):
  model, cfg, _ = gpt2
  state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  state["lm_head.weight"] = state["transformer.wte.weight"] + 1.0
  with pytest.raises(ConversionError, match=r"gpt2 checkpoint's lm_head.weight differs from "
                     r"transformer.wte.weight: config.tie_word_embeddings=True"):
    FAMILIES["gpt2"].params_from_hf(state, cfg)


# Safe reading of checkpoint directories.

def _assert_same(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    if isinstance(a[key], dict):
      _assert_same(a[key], b[key])
    else:
      np.testing.assert_array_equal(a[key], b[key])


def test_pickle_weights_need_allow_pickle(gpt2, tmp_path):
  model, cfg, params = gpt2
  model.config.save_pretrained(tmp_path)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  message = (rf"{re.escape(str(tmp_path))} holds only PyTorch pickle weights "
             r"\(pytorch_model.bin\), which can run code when loaded; .*allow_pickle=True "
             r"\(train: --config.train.init_from_pickle=True\)")
  with pytest.raises(ConversionError, match=message):
    load_pretrained(tmp_path)
  with pytest.raises(ConversionError, match=message):
    init_from.pretrained(str(tmp_path))
  loaded_cfg, loaded = load_pretrained(tmp_path, allow_pickle=True)
  assert loaded_cfg == cfg
  _assert_same(loaded, params)
  base_cfg, via_init_from, _ = init_from.pretrained(str(tmp_path), allow_pickle=True)
  assert base_cfg == cfg
  _assert_same(via_init_from, params)
  os.remove(tmp_path / "pytorch_model.bin")
  with pytest.raises(ConversionError, match=r"holds no weights: no model.safetensors"):
    load_pretrained(tmp_path, allow_pickle=True)


@pytest.mark.parametrize("index_name, shard", [
    ("model.safetensors.index.json", "../outside.safetensors"),
    ("model.safetensors.index.json", "sub/../../outside.safetensors"),
    ("model.safetensors.index.json", "{abs}"),
    ("pytorch_model.bin.index.json", "../outside.bin"),
])
def test_index_shards_outside_the_directory_are_refused(gpt2, tmp_path, index_name, shard):
  model, _, _ = gpt2
  model.save_pretrained(tmp_path / "outside_src")  # a real shard, so only the name is wrong
  os.rename(tmp_path / "outside_src" / "model.safetensors", tmp_path / "outside.safetensors")
  torch.save(model.state_dict(), tmp_path / "outside.bin")
  directory = tmp_path / "model"
  model.config.save_pretrained(directory)
  shard = shard.format(abs=tmp_path / "outside.safetensors")
  with open(directory / index_name, "w") as f:
    json.dump({"metadata": {}, "weight_map": {k: shard for k in model.state_dict()}}, f)
  with pytest.raises(ConversionError, match=rf"{index_name} names shard "
                     rf"{re.escape(repr(shard))}, which is outside the model directory"):
    load_pretrained(directory, allow_pickle=True)


def test_sharded_safetensors_inside_the_directory_load(gpt2, tmp_path):
  model, _, params = gpt2
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  with open(tmp_path / "model.safetensors.index.json") as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1  # really sharded
  _assert_same(load_pretrained(tmp_path)[1], params)
  os.remove(tmp_path / sorted(p for p in os.listdir(tmp_path) if p.endswith("safetensors"))[0])
  with pytest.raises(ConversionError, match=r"names shard '.*', which is missing"):
    load_pretrained(tmp_path)
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    f.write("{not json")
  with pytest.raises(ConversionError, match=r"model.safetensors.index.json is not a "
                     r"checkpoint index \(a JSON object with a weight_map"):
    load_pretrained(tmp_path)
  with pytest.raises(ConversionError, match=r"has no config.json: not a Hugging Face "
                     r"checkpoint directory"):
    load_pretrained(tmp_path / "elsewhere")
