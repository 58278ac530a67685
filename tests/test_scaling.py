"""The planner's arithmetic: parameter counts against the init tree, FLOPs against XLA's
cost analysis, per-device memory against hand counts, Chinchilla against its definition."""

import dataclasses
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from llm import config as config_lib
from llm import models, scaling
from llm.config import ParallelConfig
from tests.helpers import GPT_TINY, LLAMA_TINY, random_params

FAMILIES = {
    "gpt": GPT_TINY,
    "llama_moe_every_2": dict(LLAMA_TINY, num_layers=4, moe=dict(num_experts=4, every=2)),
    "bloom": dict(GPT_TINY, positions="alibi", embed_norm=True),
    "bert": dict(GPT_TINY, family="encoder", post_norm=True, embed_norm=True,
                 type_vocab_size=2, position_offset=2),
    "t5_moe": dict(GPT_TINY, family="encoder_decoder", positions="relative", norm="rmsnorm",
                   use_bias=False, activation="geglu", tie_embeddings=False,
                   num_decoder_layers=3, moe=dict(num_experts=4)),
    "bart": dict(GPT_TINY, family="encoder_decoder", post_norm=True, embed_norm=True,
                 position_offset=2),
}


def _init_inputs(cfg):
  tokens = np.ones((1, 8), np.int32)
  return (tokens, tokens) if cfg.family == "encoder_decoder" else (tokens,)


@pytest.mark.parametrize("name", FAMILIES)
def test_exact_param_count_is_the_size_of_the_init_tree(name):
  cfg = config_lib.model_from_dict(FAMILIES[name])
  shapes = jax.eval_shape(models.build(cfg).init, jax.random.PRNGKey(0), *_init_inputs(cfg))
  assert scaling.exact_param_count(cfg) == sum(
      x.size for x in jax.tree_util.tree_leaves(nn.unbox(shapes["params"])))


def test_full_size_counts_are_the_published_ones():
  from configs import gpt, moe, t5
  count = lambda c: scaling.exact_param_count(config_lib.from_configdict(c).model)
  assert count(gpt.get_config("gpt2")) == 124_439_808  # HF GPT2LMHeadModel
  assert count(moe.get_config("mixtral")) == 46_702_792_704  # HF MixtralForCausalLM
  assert count(t5.get_config("small")) == 60_506_624  # T5-small as published (60.5M)


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_forward_flops_match_the_compilers_count(family):
  """XLA counts every dot (and the elementwise ops, a few % at this width); the layers are
  unrolled because XLA's cost analysis counts a scan body once."""
  over = dict(LLAMA_TINY, d_model=64, d_ff=256, vocab_size=512, scan_layers=False)
  if family == "encoder_decoder":
    over.update(family=family, positions="relative")
  cfg = config_lib.model_from_dict(over)
  module = models.build(cfg)
  tokens = np.ones((4, 32), np.int32)
  inputs = (tokens, tokens) if family == "encoder_decoder" else (tokens,)
  params = random_params(module, *inputs)
  flops = jax.jit(lambda p, *x: module.apply({"params": p}, *x)).lower(
      params, *inputs).cost_analysis()["flops"]
  expected = scaling.forward_flops_per_token(cfg, 32) * tokens.size
  assert abs(flops - expected) / expected < 0.05, (flops, expected)


def test_train_flops_by_hand():
  cfg = config_lib.model_from_dict(GPT_TINY)  # d 32, 2 layers, 4 heads, ff 64, vocab 64
  matmul = 2 * (4 * 32 * 32 + 2 * 32 * 64) + 64 * 32
  assert scaling.matmul_params(cfg) == matmul
  assert scaling.train_flops_per_token(cfg, 16) == 6 * matmul + 6 * 2 * 16 * 32
  encoder = config_lib.model_from_dict(dict(GPT_TINY, family="encoder"))
  assert scaling.train_flops_per_token(encoder, 16) == 6 * matmul + 12 * 2 * 16 * 32
  assert scaling.forward_flops_per_token(cfg, 16) == 2 * matmul + 4 * 2 * 16 * 32


def _config(model):
  return config_lib.from_configdict({"model": model, "data": dict(seq_len=16, batch_size=8)})


def test_params_per_device_follow_the_sharding_rules():
  cfg = _config(GPT_TINY)
  # fsdp x tensor split every matrix 4 ways; vectors carry one sharded name (embed or
  # heads/mlp), so they split 2 ways; the layer axis is never split.
  matrices = 64 * 32 + 2 * (4 * 32 * 32 + 2 * 32 * 64)
  vectors = 32 * 32 + 2 * (3 * 32 + 32 + 64 + 32 + 4 * 32) + 2 * 32
  sizes = dict(data=2, fsdp=2, tensor=2, expert=1)
  assert scaling.sharded_param_elements(cfg, sizes)["all"] == matrices // 4 + vectors // 2
  replicated = dict(data=8, fsdp=1, tensor=1, expert=1)
  assert scaling.sharded_param_elements(cfg, replicated)["all"] == \
      scaling.exact_param_count(cfg.model)
  moe = _config(dict(LLAMA_TINY, moe=dict(num_experts=4)))
  on_experts = scaling.sharded_param_elements(moe, dict(data=1, fsdp=2, tensor=1, expert=4))
  experts = 2 * 4 * 3 * 32 * 64  # 2 layers x 4 experts x (gate, up, out)
  assert on_experts["experts"] == experts // 8


def test_train_and_inference_memory_components():
  cfg = _config(dict(GPT_TINY, dtype="bfloat16"))
  pcfg = ParallelConfig(data=2, fsdp=4)
  mem = scaling.train_memory(cfg, pcfg, remat="none")
  elements = scaling.sharded_param_elements(cfg, dict(data=2, fsdp=4, tensor=1, expert=1))
  assert mem["params"] == 4 * elements["all"] and mem["optimizer"] == 2 * mem["params"]
  assert mem["gradients"] == mem["params"]
  assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"))
  by_remat = {r: scaling.activation_bytes(cfg.model, 128, 16, remat=r)["total"]
              for r in ("none", "dots", "full")}
  assert by_remat["full"] < by_remat["dots"] < by_remat["none"]
  double = scaling.activation_bytes(cfg.model, 256, 16, remat="none")["total"]
  assert double == pytest.approx(2 * by_remat["none"])
  split = scaling.activation_bytes(cfg.model, 128, 16, tensor=2, remat="none")["total"]
  assert by_remat["none"] / 2 < split < by_remat["none"]
  plain = _config(GPT_TINY)
  accumulated = dataclasses.replace(plain, train=dataclasses.replace(plain.train, microbatches=2))
  assert scaling.train_memory(accumulated, pcfg)["gradients"] == 2 * scaling.train_memory(
      plain, pcfg)["gradients"]
  serve = scaling.inference_memory(cfg.model, ParallelConfig(data=1, tensor=2), batch=4,
                                   context_len=32)
  assert serve["kv_cache"] == 4 * 32 * 2 * 2 * 4 * 8 * 2 / 2  # rows S L (k, v) K H bf16 / t
  assert serve["params"] == scaling.exact_param_count(cfg.model) * 2 / 2


def test_chinchilla_budgets():
  assert scaling.pf_days(3.14e23) == pytest.approx(3640, rel=0.01)  # GPT-3 (Brown et al.)
  assert scaling.chinchilla_tokens(70e9) == 1.4e12  # Chinchilla: 70B params, 1.4T tokens
  budget = 5.76e23  # Gopher's compute
  best = scaling.chinchilla_optimal(budget)
  assert 6 * best["rule"]["params"] * best["rule"]["tokens"] == pytest.approx(budget)
  n = np.logspace(9, 12, 4000)  # the fit's optimum is the minimum of L(N, C / 6N)
  numeric = n[np.argmin([scaling.hoffmann_loss(x, budget / (6 * x)) for x in n])]
  assert best["fit"]["params"] == pytest.approx(numeric, rel=0.01)
  assert 6 * best["fit"]["params"] * best["fit"]["tokens"] == pytest.approx(budget)
  tokens = scaling.optimal_tokens(best["fit"]["params"])["fit"]
  assert tokens == pytest.approx(best["fit"]["tokens"], rel=1e-6)


def test_time_to_train_and_the_chip_table():
  v5p = scaling.chip("v5p")
  assert (v5p.peak_flops, v5p.memory) == (459e12, 95e9)
  assert scaling.step_seconds(1e9, 1e6, 100, v5p, 0.5) == pytest.approx(1e15 / (100 * 459e12 * 0.5))
  assert scaling.train_days(1e9, 86400e6, 100, v5p, 0.5) == pytest.approx(
      1e15 / (100 * 459e12 * 0.5))
  assert {"v4", "v5e", "v5p", "v6e", "a100", "h100", "h200"} <= set(scaling.CHIPS)
  with pytest.raises(ValueError, match="--chip='tpu9': unknown chip"):
    scaling.chip("tpu9")


def test_plan_prints_the_table():
  out = subprocess.run([sys.executable, "-m", "experiments.plan", "--config",
                        "configs/moe.py:tiny", "--chips", "8", "--chip", "v5e"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  for line in ("parameters", "data ", "fsdp ", "fsdp x tensor 4", "fsdp x expert 4",
               "yes / yes", "days", "Chinchilla-optimal tokens", "Hoffmann fit"):
    assert line in out.stdout, (line, out.stdout)
