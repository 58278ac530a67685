"""Parameter-efficient adaptation: LoRA / adapters start at the base model, merge exactly,
train only their own params; prompt tuning prepends exactly n positions; adapters are
saved alone and refuse another base; bad input fails with a named one-line error."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm import config as config_lib, models, objectives, peft
from llm.config import ConfigError
from llm.inference import decode
from llm.inference.generate import prompt_inputs
from llm.models.blocks import Embed
from llm.peft import prompt as prompt_lib
from llm.train import loop
from llm.train.state import init_state
from llm.train.step import train_step

from helpers import random_batch, random_params

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
  return module, jax.device_get(nn.unbox(params)), batch


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
  # One pair per table, shared by its lookup and (tied) head; untied tables are only looked
  # up, so their pair exists only because the lookup is adapted.
  cfg = module.cfg
  assert lora["embed"]["lora_a"].shape == (cfg.d_model, 4)
  assert lora["embed"]["lora_b"].shape == (4, cfg.vocab_size)
  assert ("pos_embed/lora_b" in " ".join(lora_paths)) == (cfg.positions == "learned")
  _check_embed_lora(adapted["embed"], cfg.peft)
  # Exact for tied tables too: only if the lookup sees the same E + dE as the head.
  merged = peft.lora.merge(adapted, module.cfg.peft)
  assert not any("lora" in p for p in peft.paths(merged))
  # f32 reassociation of x (W + dW) vs x W + x dW: relative to the logits' scale.
  assert np.abs(_logits(base, merged, batch) - out).max() < 1e-4 * np.abs(out).max()
  restored = peft.lora.unmerge(merged, moved, module.cfg.peft)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(adapted)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def _check_embed_lora(embed_params, peft_cfg):
  """A lone Embed under the interceptor: its rows and its head are those of the table
  E + (alpha/r) (A B)^T."""
  table, a, b = (np.asarray(embed_params[k]) for k in ("embedding", "lora_a", "lora_b"))
  adapted = table + peft_cfg.lora_alpha / peft_cfg.lora_rank * (a @ b).T
  embed = Embed(*table.shape)
  ids = np.array([[3, 1, 3, 0], [2, 5, 7, 1]])
  x = np.random.default_rng(2).standard_normal((2, 3, table.shape[1])).astype(np.float32)
  with nn.intercept_methods(peft.lora.interceptor(peft_cfg)):
    rows = embed.apply({"params": embed_params}, ids)
    logits = embed.apply({"params": embed_params}, x, attend=True)
  assert np.abs(adapted[ids] - table[ids]).max() > 1e-2  # the update is not negligible
  np.testing.assert_allclose(rows, adapted[ids], atol=1e-5)
  np.testing.assert_allclose(logits, x @ adapted.T, atol=1e-4)


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


@pytest.fixture(scope="module")
def t5_prefix():
  """A prefix-tuned T5 (params at 10x the init's scale: greedy outputs vary), the "vocab"
  init of its prefix, and a batch: row 0 the virtual tokens and 8 real encoder tokens,
  row 1 the virtual tokens and padding. No real token is a stand-in."""
  n = 3
  cfg = config_lib.model_from_dict({**T5, "scan_layers": False,  # compiles faster
                                    "peft": {"method": "prefix", "prompt_length": n}})
  module = models.build(cfg)
  stand_in = peft.prefix.stand_in_ids(n, cfg.vocab_size)
  batch = random_batch(batch=2, seq_len=8, vocab=cfg.vocab_size)
  free = min(set(range(5, cfg.vocab_size)) - set(stand_in.tolist()))
  for key in ("inputs", "targets"):
    batch[key] = np.where(np.isin(batch[key], stand_in), free, batch[key]).astype(np.int32)
  encoder_in = batch["targets"][:, ::-1] * np.array([[1], [0]], np.int32)
  batch = prompt_lib.prepend_virtual_tokens({**batch, "encoder_inputs": encoder_in}, n, cfg)
  batch["encoder_segment_ids"] = (batch["encoder_inputs"] != 0).astype(np.int32)
  params = random_params(module, batch["encoder_inputs"], batch["inputs"], std=0.2)
  return module, peft.prefix.init_from_base(module, params, seed=0), batch


def test_prefix_tuning_an_encoder_decoder_blocks_every_path_from_the_virtual_tokens(t5_prefix):
  module, params, batch = t5_prefix
  cfg, n = module.cfg, module.cfg.peft.prompt_length
  prefix, frozen = peft.split(params, peft.trainable_pattern(cfg.peft))
  # Encoder self-attention and cross-attention; the decoder's self-attention keeps its own.
  assert sorted(peft.paths(prefix)) == [
      f"{stack}/layers_{i}/{attn}/{kv}/prefix" for stack, attn in (("decoder", "cross"),
                                                                    ("encoder", "attn"))
      for i in range(cfg.num_layers) for kv in ("key", "value")]
  forward = jax.jit(lambda p, b: models.apply_batch(module, p, b)[0])
  base = models.build(dataclasses.replace(cfg, peft=config_lib.PeftConfig()))
  base_forward = jax.jit(lambda p, b: models.apply_batch(base, p, b)[0])
  stand_in = peft.prefix.stand_in_ids(n, cfg.vocab_size)
  real = dict(batch, encoder_inputs=np.concatenate(
      [np.tile(stand_in, (2, 1)), batch["encoder_inputs"][:, n:]], 1))
  # The "vocab" init holds the base's keys and values of the stand-ins encoded alone:
  # beside padding only (row 1) the model is the base reading the stand-ins. Beside real
  # tokens (row 0) it is not: there the base's stand-ins attend to those tokens.
  start, base_out = np.asarray(forward(params, batch)), np.asarray(base_forward(frozen, real))
  np.testing.assert_allclose(start[1], base_out[1], atol=1e-5)
  assert np.abs(start[0] - base_out[0]).max() > 1e-3
  # What the model computes at the virtual positions (from the stand-ins' embeddings)
  # reaches no real token, in the encoder nor through the cross-attention; the base
  # reads it.
  rng = np.random.default_rng(1)
  moved = peft.merge(jax.tree_util.tree_map(
      lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(x.dtype), prefix), frozen)
  out = np.asarray(forward(moved, batch))
  assert np.abs(out - start).max() > 1e-2
  table = np.array(frozen["embed"]["embedding"])
  table[stand_in] += 1.0
  other = lambda tree: {**tree, "embed": {"embedding": table}}
  np.testing.assert_allclose(forward(other(moved), batch), out, atol=1e-6)
  assert np.abs(base_forward(other(frozen), real) - base_out).max() > 1e-2
  # Generation (encode once, fill the cross cache on the first decode call, then greedy
  # steps) reads the prefix as the cross keys and values of every row, whatever its
  # real tokens, and gives the full forward's argmax and logits.
  dec_module, dec_params = decode.for_decoding(module, moved)
  prompts = [row.tolist() for row in batch["encoder_inputs"]]
  prompts[1] = prompts[1][:n]
  inputs, _ = prompt_inputs(cfg, prompts, max_new_tokens=3)
  state = jax.jit(functools.partial(decode.prefill, dec_module, cache_len=4))(
      dec_params, **inputs)
  for i in range(cfg.num_layers):
    cached = state.cache["decoder"][f"layers_{i}"]["cross"]
    for name, kv in (("key", "cross_key"), ("value", "cross_value")):
      want = moved["decoder"][f"layers_{i}"]["cross"][name]["prefix"]
      np.testing.assert_allclose(cached[kv][:, :n], np.stack([want] * 2), atol=1e-6)
  step = jax.jit(lambda p, s, t: decode.decode_step(dec_module, p, s, t))
  greedy, logits = [], []
  for _ in range(3):
    logits.append(np.asarray(state.logits_BV))
    greedy.append(np.argmax(logits[-1], -1).astype(np.int32))
    _, state = step(dec_params, state, greedy[-1][:, None])
  decoded = np.zeros_like(batch["inputs"])
  decoded[:, 1:4] = np.stack(greedy, 1)
  full = np.asarray(forward(moved, dict(batch, inputs=decoded)))
  np.testing.assert_array_equal(full[:, :3].argmax(-1), np.stack(greedy, 1))
  np.testing.assert_allclose(full[:, :3], np.stack(logits, 1), atol=1e-4)


def test_training_an_encoder_decoder_prefix_moves_every_layer_of_it_and_nothing_else(t5_prefix):
  module, params, batch = t5_prefix
  pattern = peft.trainable_pattern(module.cfg.peft)
  loss = functools.partial(objectives.get("span").loss, module)
  state = init_state(module, loss, optax.sgd(1.0), batch, 0, pattern, params=params)
  trainable0, frozen0 = jax.device_get(state.params), jax.device_get(state.frozen)
  state, metrics = jax.jit(train_step)(state, batch)
  assert np.isfinite(float(metrics["train_loss"]))
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state.frozen)),
                  jax.tree_util.tree_leaves(frozen0)):
    np.testing.assert_array_equal(a, b)  # bitwise unchanged
  # Every layer's prefix (one leaf each), encoder self-attention and cross-attention,
  # got a gradient.
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state.params)),
                  jax.tree_util.tree_leaves(trainable0)):
    assert np.abs(a - b).max() > 0


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
