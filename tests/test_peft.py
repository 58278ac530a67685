"""Parameter-efficient adaptation: LoRA / adapters start at the base model, merge exactly,
train only their own params; prompt tuning prepends exactly n positions; adapters are
saved alone and refuse another base; bad input fails with a named one-line error."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm import config as config_lib, models, peft
from llm.config import ConfigError
from llm.inference import decode
from llm.peft import prompt as prompt_lib
from llm.train import loop
from llm.train.step import train_step

from helpers import random_batch

DECODER = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
               max_len=32, positions="rope", norm="rmsnorm", activation="swiglu",
               use_bias=False, tie_embeddings=False, moe=dict(num_experts=4, top_k=2, every=2))
GPT = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=32)
ENCODER = dict(GPT, family="encoder", post_norm=True, embed_norm=True, type_vocab_size=2)
T5 = dict(GPT, family="encoder_decoder", positions="relative", norm="rmsnorm", use_bias=False,
          scale_attention=False, activation="geglu", tie_embeddings=False)


def _init(model: dict, **peft_cfg):
  cfg = config_lib.model_from_dict({**model, "peft": peft_cfg})
  module = models.build(cfg)
  batch = _batch(cfg)
  params = jax.jit(lambda: jax.tree_util.tree_map(
      lambda x: x, module.init(jax.random.PRNGKey(0),
                               *models.batch_inputs(cfg, batch, init=True))["params"]))()
  return module, jax.device_get(__import__("flax").linen.unbox(params)), batch


def _batch(cfg):
  batch = random_batch(batch=2, seq_len=8, vocab=cfg.vocab_size)
  if cfg.family == "encoder_decoder":
    batch = {**batch, "encoder_inputs": batch["inputs"][:, ::-1].copy(),
             "encoder_segment_ids": batch["segment_ids"]}
  return batch


def _logits(module, params, batch):
  kwargs = {"output": "mlm"} if module.cfg.family == "encoder" else {}
  return np.asarray(jax.jit(lambda p, b: models.apply_batch(module, p, b, **kwargs)[0])(
      params, batch))


@pytest.mark.parametrize("model", [DECODER, ENCODER, T5], ids=["llama_moe", "bert", "t5"])
def test_lora_starts_at_the_base_model_merges_and_unmerges_exactly(model):
  module, params, batch = _init(model, method="lora", lora_targets=".*", lora_rank=4)
  base = models.build(dataclasses.replace(module.cfg, peft=config_lib.PeftConfig()))
  lora, frozen = peft.split(params, peft.trainable_pattern(module.cfg.peft))
  lora_paths = peft.paths(lora)
  # Every projection got a LoRA pair: attention, MLP or experts, and (if tied) the head.
  kernels = [p for p in peft.paths(frozen) if p.endswith(("kernel", "embedding"))]
  assert len(lora_paths) >= 2 * (len(kernels) - 2)
  if model is DECODER:
    assert any("moe/wi_gate/lora_a" in p for p in lora_paths)
  # B = 0: the same function (up to float reassociation of y + 0).
  np.testing.assert_allclose(_logits(module, params, batch), _logits(base, frozen, batch),
                             atol=1e-6)

  moved = jax.tree_util.tree_map(
      lambda x: x + 0.1 * np.random.default_rng(1).standard_normal(x.shape), lora)
  adapted = peft.merge(moved, frozen)
  out = _logits(module, adapted, batch)
  assert np.abs(out - _logits(base, frozen, batch)).max() > 1e-2  # LoRA now changes logits
  if module.cfg.tie_embeddings:
    with pytest.raises(ConfigError, match="tied output embedding cannot be merged"):
      peft.lora.merge(adapted, module.cfg.peft)
    return
  merged = peft.lora.merge(adapted, module.cfg.peft)
  assert not any("lora" in p for p in peft.paths(merged))
  # f32 reassociation of x (W + dW) vs x W + x dW: relative to the logits' scale.
  assert np.abs(_logits(base, merged, batch) - out).max() < 1e-4 * np.abs(out).max()
  restored = peft.lora.unmerge(merged, moved, module.cfg.peft)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(adapted)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_adapters_start_at_the_base_model_in_every_sublayer():
  module, params, batch = _init(T5, method="adapter", adapter_dim=4)
  adapters, frozen = peft.split(params, peft.trainable_pattern(module.cfg.peft))
  names = {p.split("/")[-2] for p in peft.paths(adapters)}
  assert names == {"attn", "cross", "mlp"}  # after self-, cross-attention and MLP
  base = models.build(dataclasses.replace(module.cfg, peft=config_lib.PeftConfig()))
  np.testing.assert_allclose(_logits(module, params, batch), _logits(base, frozen, batch),
                             atol=1e-6)


def test_virtual_tokens_are_the_soft_prompt_and_carry_no_loss():
  n = 3
  module, params, batch = _init(GPT, method="prompt", prompt_length=n)
  cfg = module.cfg
  longer = prompt_lib.prepend_virtual_tokens(batch, n, cfg)
  assert longer["inputs"].shape == (2, 8 + n)
  np.testing.assert_array_equal(longer["inputs"][:, :n], [[-1, -2, -3]] * 2)
  np.testing.assert_array_equal(longer["weights"][:, :n], 0)
  np.testing.assert_array_equal(longer["positions"][:, n:], batch["positions"] + n)
  np.testing.assert_array_equal(longer["targets"][:, n:], batch["targets"])
  # A soft prompt equal to the embeddings of real tokens x makes the model see x.
  x = np.array([7, 11, 13])
  soft = params["embed"]["embedding"][x]
  set_params = {**params, "embed": {**params["embed"], "soft_prompt": soft}}
  base = models.build(dataclasses.replace(cfg, peft=config_lib.PeftConfig()))
  real = dict(longer, inputs=np.concatenate([np.tile(x, (2, 1)), batch["inputs"]], 1))
  base_params = {**params, "embed": {"embedding": params["embed"]["embedding"]}}
  np.testing.assert_allclose(_logits(module, set_params, longer), _logits(base, base_params, real),
                             atol=1e-6)
  with pytest.raises(ConfigError, match="prompt_length=30 plus the input"):
    prompt_lib.prepend_virtual_tokens(batch, 30, cfg)


@pytest.fixture(scope="module")
def prefix_model():
  module, params, batch = _init(GPT, method="prefix", prompt_length=3)
  return module, peft.prefix.init_from_base(module, params, seed=0), batch


def test_prefix_tuning_replaces_keys_and_values_at_the_virtual_tokens(prefix_model):
  module, params, batch = prefix_model
  cfg, n = module.cfg, module.cfg.peft.prompt_length
  prefix, frozen = peft.split(params, peft.trainable_pattern(cfg.peft))
  assert sorted(peft.paths(prefix)) == ["layers/attn/key/prefix", "layers/attn/value/prefix"]
  assert prefix["layers"]["attn"]["key"]["prefix"].shape == (cfg.num_layers, n, cfg.kv_heads,
                                                            cfg.dim_per_head)
  longer = prompt_lib.prepend_virtual_tokens(batch, n, cfg)
  forward = jax.jit(lambda p, b: models.apply_batch(module, p, b)[0])
  # Initialised from the base: the prefix model is the base model reading the stand-ins.
  base = models.build(dataclasses.replace(cfg, peft=config_lib.PeftConfig()))
  stand_in = np.tile(peft.prefix.stand_in_ids(n, cfg.vocab_size), (2, 1))
  real = dict(longer, inputs=np.concatenate([stand_in, batch["inputs"]], 1))
  np.testing.assert_allclose(forward(params, longer), _logits(base, frozen, real), atol=1e-6)
  # A moved prefix changes what real tokens see; what the model computes at the virtual
  # positions (here their position embeddings) no longer reaches them.
  rng = np.random.default_rng(1)
  moved = peft.merge(jax.tree_util.tree_map(lambda x: x + rng.standard_normal(x.shape), prefix),
                     frozen)
  out = np.asarray(forward(moved, longer))
  assert np.abs(out - forward(params, longer)).max() > 1e-2
  # Every layer's keys and values get a gradient (the trainable part: the prefix alone).
  loss = lambda t, b: models.apply_batch(module, peft.merge(t, frozen), b)[0][:, n:].std()
  grads = jax.jit(jax.grad(loss))(prefix, longer)
  assert all((np.abs(g).reshape(cfg.num_layers, -1).max(1) > 0).all()
             for g in jax.tree_util.tree_leaves(grads))
  pos = np.array(moved["pos_embed"]["embedding"])
  pos[:n] += 1.0
  shifted = {**moved, "pos_embed": {"embedding": pos}}
  np.testing.assert_allclose(forward(shifted, longer)[:, n:], out[:, n:], atol=1e-6)
  # Decoding (prefill the virtual tokens and a prompt into the cache, then one step of
  # several tokens) gives the full forward's logits.
  dec_module, dec_params = decode.for_decoding(module, moved)
  inputs, split_at = jnp.asarray(longer["inputs"]), n + 4
  state = jax.jit(lambda p, t: decode.prefill(dec_module, p, t, jnp.full((2,), split_at), 16))(
      dec_params, inputs[:, :split_at])
  np.testing.assert_allclose(state.logits_BV, out[:, split_at - 1], atol=1e-5)
  step, _ = jax.jit(lambda p, s, t: decode.decode_step(dec_module, p, s, t))(
      dec_params, state, inputs[:, split_at:])
  np.testing.assert_allclose(step, out[:, split_at:], atol=1e-5)


def _run_config(method: str, **train):
  return config_lib.from_configdict({
      "model": {**GPT, "vocab_size": 512, "max_len": 64, "peft": {"method": method}},
      "data": dict(seq_len=32, batch_size=4, max_documents=100, num_sentinels=8),
      "train": dict(steps=2, learning_rate=1e-2, peak_flops=1e9, **train),
      "parallel": dict(data=1)})


@pytest.mark.parametrize("method", ["lora", "prompt", "adapter", "bitfit"])
def test_training_moves_only_the_trainable_params(method):
  cfg = _run_config(method)
  mesh = loop.parallel.make_mesh(cfg.parallel, jax.devices()[:1])
  state, _ = loop.create_state(cfg, mesh)
  pattern = peft.trainable_pattern(cfg.model.peft)
  assert peft.paths(state.params) and all(
      __import__("re").search(pattern, p) for p in peft.paths(state.params))
  # Optimizer moments exist for the trainable params only.
  assert peft.count(state.opt_state) < 3 * peft.count(state.params) + 16
  frozen0, trainable0 = jax.device_get(state.frozen), jax.device_get(state.params)
  n = prompt_lib.num_virtual_tokens(cfg.model.peft)
  batch = random_batch(batch=4, seq_len=32 - n, vocab=512)
  if n:
    batch = prompt_lib.prepend_virtual_tokens(batch, n, cfg.model)
  step = jax.jit(train_step)
  for _ in range(2):
    state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["train_loss"]))
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state.frozen)),
                  jax.tree_util.tree_leaves(frozen0)):
    np.testing.assert_array_equal(a, b)  # bitwise unchanged
  changed = [not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(jax.device_get(state.params)),
      jax.tree_util.tree_leaves(trainable0))]
  assert any(changed)


def test_adapter_files_round_trip_and_refuse_another_base(tmp_path):
  module, params, _ = _init(GPT, method="lora", lora_rank=2)
  cfg = module.cfg
  pattern = peft.trainable_pattern(cfg.peft)
  lora, frozen = peft.split(params, pattern)
  lora = jax.tree_util.tree_map(lambda x: x + 1.0, lora)
  peft.save_adapter(str(tmp_path), cfg, lora, frozen, pattern)
  base_cfg = dataclasses.replace(cfg, peft=config_lib.PeftConfig())
  loaded_cfg, loaded = peft.load_adapter(str(tmp_path), base_cfg, frozen)
  assert loaded_cfg.peft == cfg.peft
  for a, b in zip(jax.tree_util.tree_leaves(loaded),
                  jax.tree_util.tree_leaves(peft.merge(lora, frozen))):
    np.testing.assert_array_equal(a, b)
  other_weights = jax.tree_util.tree_map(lambda x: x * 1.5, frozen)
  with pytest.raises(ConfigError, match="different base weights"):
    peft.load_adapter(str(tmp_path), base_cfg, other_weights)
  with pytest.raises(ConfigError, match="different base model .*model.d_ff"):
    peft.load_adapter(str(tmp_path), dataclasses.replace(base_cfg, d_ff=32), frozen)


def test_bad_peft_input_fails_with_a_named_one_line_error():
  with pytest.raises(ConfigError, match="lora_targets matches no projection"):
    module, params, _ = _init(GPT, method="lora", lora_targets="/nothing$")
    peft.split(params, peft.trainable_pattern(module.cfg.peft))
  with pytest.raises(ConfigError, match="lora_rank=0: must be >= 1"):
    config_lib.model_from_dict({**GPT, "peft": {"method": "lora", "lora_rank": 0}})
  with pytest.raises(ConfigError, match="model.peft.method='lorra': must be one of"):
    config_lib.model_from_dict({**GPT, "peft": {"method": "lorra"}})
  llama_like = {**DECODER, "moe": {}}
  module, params, _ = _init(llama_like, method="bitfit")
  with pytest.raises(ConfigError, match="needs biases"):
    peft.split(params, peft.trainable_pattern(module.cfg.peft))
