"""The PPO loop: sample responses with the inference sampler, score them (policy, frozen
reference, reward model) in one jitted call, turn rewards into advantages, then several
epochs of minibatch updates through the ordinary `train_step` with the "ppo" objective.

The reference is the policy's starting point and never moves. Under full fine-tuning it
is a copy of the starting weights; under LoRA it is the frozen base with the adapter
switched off (the un-adapted model run on `state.frozen`), so no second copy exists.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from llm import models, objectives, parallel
from llm.align import ppo
from llm.align.heads import VALUE_HEAD, ScalarHead
from llm.align.reward import Rater, rewards
from llm.config import Config, ConfigError, PeftConfig
from llm.data import preferences
from llm.data.sft import generation_prompt
from llm.eval.likelihood import token_log_probs
from llm.inference import SamplingConfig, for_decoding, prefill, untrained_ids
from llm.inference.generate import context_slots, sample_loop, to_generation
from llm.inference.workdir import continuation_text
from llm.peft import merge, split


@dataclasses.dataclass(frozen=True)
class Rollouts:
  """A batch of sampled responses as causal-LM rows (B, T) plus what PPO needs."""

  batch: dict  # inputs, targets, positions, segment_ids, weights (= response tokens)
  tokens: np.ndarray  # (B, T + 1) [bos] prompt response, right-padded
  segment_ids: np.ndarray  # (B, T + 1) 1 on real tokens (what the reward model reads)
  texts: list[str]  # decoded responses


@functools.partial(jax.jit, static_argnames=("module", "sampling", "cache_len"))
def _sample(module, params, tokens_BP, lengths_B, rng, sampling, cache_len):
  state = prefill(module, params, tokens_BP, lengths_B, cache_len)
  return sample_loop(module, params, state, rng, sampling)


def prompt_block(tokenizer, prompts, width: int) -> tuple[np.ndarray, np.ndarray]:
  """[bos] prompt per row, right-padded to a fixed `width` (one compile for all batches)."""
  ids = [generation_prompt(p, tokenizer, "decoder") for p in tokenizer.encode_batch(prompts)]
  if max(map(len, ids)) > width:
    raise ConfigError(f"a prompt takes {max(map(len, ids))} tokens, more than the {width} "
                      "reserved for prompts; shorten the prompts")
  tokens = np.full((len(ids), width), tokenizer.pad_id, np.int32)
  for row, p in enumerate(ids):
    tokens[row, :len(p)] = p
  return tokens, np.array([len(p) for p in ids], np.int32)


def sample_responses(module, params, tokenizer, prompts, sampling: SamplingConfig, rng,
                     width: int) -> Rollouts:
  """Responses to `prompts` as training rows: targets at response tokens weigh 1."""
  tokens_BP, lengths_B = prompt_block(tokenizer, prompts, width)
  dec_module, dec_params = for_decoding(module, params)
  cache_len = context_slots(module.cfg, width, sampling.max_new_tokens)
  new_BN, logp_BN = _sample(dec_module, dec_params, tokens_BP, lengths_B, rng, sampling,
                            cache_len)
  gen = to_generation(new_BN, logp_BN, sampling.eos_id)
  batch, total = len(prompts), width + sampling.max_new_tokens
  seq = np.full((batch, total), tokenizer.pad_id, np.int32)
  response = np.zeros((batch, total), np.float32)
  texts = []
  for b in range(batch):
    prompt, new = tokens_BP[b, :lengths_B[b]], gen.tokens[b, :gen.lengths[b]]
    seq[b, :len(prompt) + len(new)] = np.concatenate([prompt, new])
    response[b, len(prompt):len(prompt) + len(new)] = 1.0
    texts.append(continuation_text(tokenizer, prompt.tolist(),
                                   [t for t in new.tolist() if t != tokenizer.eos_id]))
  segments = (np.arange(total) < (lengths_B + gen.lengths)[:, None]).astype(np.int32)
  rows = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "weights": response[:, 1:],
          "segment_ids": segments[:, :-1],
          "positions": np.tile(np.arange(total - 1, dtype=np.int32), (batch, 1))}
  return Rollouts(rows, seq, segments, texts)


@functools.partial(jax.jit, static_argnames=("policy", "reference", "rater"))
def score(policy, params, reference, ref_params, rater, rater_params, batch, tokens, segments):
  """Policy log-probs and values, reference log-probs, exact KL, entropy, RM score."""
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  logits, values = policy.apply({"params": params}, *args, with_logits=True)
  ref_logits, _ = reference.apply({"params": ref_params}, *args, with_logits=True)
  return {"logprobs": token_log_probs(logits, batch["targets"]), "values": values,
          "ref_logprobs": token_log_probs(ref_logits, batch["targets"]),
          "exact_kl": ppo.exact_kl(logits, ref_logits), "entropy": ppo.entropy(logits),
          "score": rewards(rater, rater_params, tokens, segments)}


@functools.partial(jax.jit, static_argnames=("gamma", "lam"))
def advantages(scored, mask, kl_coef, gamma, lam):
  kl = ppo.kl_estimate(scored["logprobs"], scored["ref_logprobs"]) * mask
  token_rewards = ppo.token_rewards(scored["score"], kl, mask, kl_coef)
  adv, returns = ppo.gae(token_rewards, scored["values"], mask, gamma, lam)
  return ppo.whiten(adv, mask), returns, kl


def policy_params(cfg: Config, base_params: dict | None) -> dict:
  """A fresh policy with a value head, the base weights overlaid (None: random init)."""
  from llm.train import init_from
  from llm.train.state import init_params
  module = ScalarHead(cfg.model, VALUE_HEAD)
  example = {"inputs": np.zeros((1, cfg.data.seq_len), np.int32)}
  fresh = jax.device_get(jax.jit(lambda: init_params(module, example, cfg.train.seed))())
  return fresh if base_params is None else init_from.overlay(fresh, base_params)


def _check(cfg: Config):
  if not cfg.train.init_from:
    raise ConfigError("config.train.init_from is empty: PPO starts from a trained policy "
                      "(a fine-tuned workdir), which is also its reference")
  if not cfg.align.rater:
    raise ConfigError("config.align.rater is empty: give the reward model's workdir "
                      "(experiments.reward_model)")


def summary(scored, kl, mask, texts, score_true: bool) -> dict:
  """Per-rollout means: RM score, KL per response (sampled and exact), entropy per token,
  the reference's perplexity of the responses, their length and the true score."""
  mask = np.asarray(mask)
  tokens = np.maximum(mask.sum(), 1.0)
  out = {"reward": float(np.mean(scored["score"])),
         "kl": float(np.mean(np.sum(np.asarray(kl), 1))),
         "exact_kl": float(np.mean(np.sum(np.asarray(scored["exact_kl"]) * mask, 1))),
         "entropy": float(np.sum(np.asarray(scored["entropy"]) * mask) / tokens),
         "ref_perplexity": float(np.exp(-np.sum(np.asarray(scored["ref_logprobs"]) * mask)
                                        / tokens)),
         "response_tokens": float(mask.sum(1).mean())}
  if score_true:
    out["true_score"] = float(np.mean([preferences.true_score(t) for t in texts]))
  return out


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every rollout of one PPO run uses; the train state changes, this does not."""

  cfg: Config
  tokenizer: object
  rater: Rater
  prompts: list
  width: int  # prompt tokens reserved per row
  mesh: object
  train_fn: object
  policy: object  # the policy with its value head (ScalarHead)
  lm: object  # the same policy as a plain LM, for sampling
  reference: object  # the un-adapted model (adapter off under LoRA)
  ref_copy: object  # full fine-tuning: the start's weights; LoRA: None (state.frozen is it)
  sampling: SamplingConfig


def setup(cfg: Config, params: dict, tokenizer, rater: Rater, mesh):
  """(Setup, initial train state) of a PPO run from `params` (policy + value head)."""
  from llm.train import create_state
  from llm.train.loop import compiled_steps
  a = cfg.align
  if cfg.model.peft.method not in ("full", "lora"):
    raise ConfigError(f"config.model.peft.method={cfg.model.peft.method!r}: PPO trains full "
                      "or lora")
  rater.check_tokenizer(tokenizer)
  prompts = preferences.prompts_of(a.preferences, "train", cfg.data.shuffle_seed)
  width = max(len(p) for p in tokenizer.encode_batch(prompts)) + 1
  context_slots(cfg.model, width, a.response_len)  # fails early if it cannot fit
  updates = cfg.train.steps * a.ppo_epochs * a.ppo_minibatches
  state_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=updates))
  state, shardings = create_state(state_cfg, mesh, params)
  train_fn, _ = compiled_steps(shardings, mesh)
  lora = cfg.model.peft.method == "lora"
  sampling = SamplingConfig(temperature=a.temperature, max_new_tokens=a.response_len,
                            eos_id=tokenizer.eos_id, suppress_ids=untrained_ids(tokenizer))
  return Setup(cfg, tokenizer, rater, prompts, width, mesh, train_fn,
               objectives.for_config(cfg).build(cfg), models.build(cfg.model),
               ScalarHead(dataclasses.replace(cfg.model, peft=PeftConfig()), VALUE_HEAD),
               None if lora else jax.tree_util.tree_map(jnp.copy, state.params),
               sampling), state


def ppo_iteration(run: Setup, state, kl_coef: float, step: int, rng: np.random.Generator):
  """One rollout batch and its epochs of minibatch updates -> (state, metrics)."""
  a = run.cfg.align
  params = merge(state.params, state.frozen)
  ref_params = run.ref_copy if run.ref_copy is not None else {
      **state.frozen, VALUE_HEAD: state.params[VALUE_HEAD]}  # values unused
  chosen = [run.prompts[i] for i in rng.integers(len(run.prompts), size=a.rollout_batch)]
  rollouts = sample_responses(run.lm, params, run.tokenizer, chosen, run.sampling,
                              jax.random.PRNGKey(run.cfg.train.seed * 100003 + step), run.width)
  scored = score(run.policy, params, run.reference, ref_params, run.rater.module,
                 run.rater.params, rollouts.batch, rollouts.tokens, rollouts.segment_ids)
  mask = rollouts.batch["weights"]
  adv, returns, kl = advantages(scored, mask, kl_coef, a.gamma, a.gae_lambda)
  data = jax.device_get({**rollouts.batch, "old_logprobs": scored["logprobs"],
                         "old_values": scored["values"], "advantages": adv, "returns": returns})
  updates = []
  for _ in range(a.ppo_epochs):
    for part in np.split(rng.permutation(a.rollout_batch), a.ppo_minibatches):
      state, m = run.train_fn(state, parallel.shard_batch({k: v[part] for k, v in data.items()},
                                                          run.mesh))
      updates.append(m)
  updates = jax.device_get(updates)
  means = {k: float(np.mean([m[k] for m in updates])) for k in updates[0]
           if k.startswith("train_")}
  return state, {"step": step, "kl_coef": kl_coef, **means,
                 **summary(jax.device_get(scored), kl, mask, rollouts.texts,
                           a.preferences == "review")}


def train_ppo(cfg: Config, workdir: str, progress: bool = True) -> dict:
  """Runs cfg.train.steps rollouts of PPO from train.init_from against align.rater;
  writes metrics.jsonl, ppo.png, a checkpoint; returns the last rollout's metrics."""
  from tqdm.auto import tqdm

  from llm.data import get_tokenizer
  from llm.train import checkpoint as ckpt, init_from
  from llm.train.metrics import MetricsWriter
  _check(cfg)
  base_cfg, base_params, tokenizer_file = init_from.pretrained(cfg.train.init_from)
  cfg = init_from.resolve(cfg, base_cfg, tokenizer_file)
  ckpt.check_writable(workdir)
  os.makedirs(workdir, exist_ok=True)
  mgr = ckpt.manager(workdir, 1, async_save=False)
  if mgr.latest_step() is not None:
    raise ConfigError(f"--workdir {workdir} already holds a PPO run; use a new --workdir")
  ckpt.check_config(workdir, cfg, resuming=False)
  ckpt.write_config(workdir, cfg)
  tokenizer = get_tokenizer(cfg.data, cfg.model.vocab_size, workdir)
  run, state = setup(cfg, policy_params(cfg, base_params), tokenizer,
                     Rater.load(cfg.align.rater), parallel.make_mesh(cfg.parallel))
  writer, rng = MetricsWriter(workdir), np.random.default_rng(cfg.train.seed)
  kl_coef, last = cfg.align.kl_coef, {}
  for step in tqdm(range(1, cfg.train.steps + 1), disable=not progress, desc="ppo"):
    state, last = ppo_iteration(run, state, kl_coef, step, rng)
    writer.write(last)
    if cfg.align.kl_target > 0:
      kl_coef = ppo.adaptive_kl_coef(kl_coef, last["kl"], cfg.align.kl_target,
                                     cfg.align.rollout_batch, cfg.align.kl_horizon)
  ckpt.save(mgr, cfg.train.steps, state.checkpoint_items(), {}, force=True)
  mgr.wait_until_finished()
  mgr.close()
  plot_ppo(workdir)
  return last


def plot_ppo(workdir: str, out_name: str = "ppo.png") -> str:
  from llm.train.metrics import read_metrics
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  records = read_metrics(workdir)
  keys = [k for k in ("reward", "true_score", "kl", "ref_perplexity") if k in records[0]]
  fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
  for ax, key in zip(np.atleast_1d(axes), keys):
    ax.plot([r["step"] for r in records], [r[key] for r in records])
    ax.set_title(key)
    ax.set_xlabel("rollout")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, out_name)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def rate_policy(cfg: Config, params, tokenizer, rater: Rater, num_samples: int = 256,
                seed: int = 0, temperature: float = 1.0) -> dict:
  """Mean reward-model score (and, on the generated task, true score) of responses
  sampled to the rater's held-out prompts."""
  rater.check_tokenizer(tokenizer, "the rated model")
  prompts = preferences.prompts_of(rater.preferences, "validation", seed)
  chosen = [prompts[i % len(prompts)] for i in range(num_samples)]
  width = max(len(p) for p in tokenizer.encode_batch(prompts)) + 1
  sampling = SamplingConfig(temperature=temperature, max_new_tokens=cfg.align.response_len,
                            eos_id=tokenizer.eos_id, suppress_ids=untrained_ids(tokenizer))
  rollouts = sample_responses(models.build(cfg.model), params, tokenizer, chosen, sampling,
                              jax.random.PRNGKey(seed), width)
  scores = np.asarray(rater.score_tokens(rollouts.tokens, rollouts.segment_ids))
  out = {"samples": num_samples, "reward": float(scores.mean())}
  if rater.preferences == "review":
    out["true_score"] = float(np.mean([preferences.true_score(t) for t in rollouts.texts]))
  return out


def rate_workdir(workdir: str, rater_workdir: str, **kwargs) -> dict:
  from llm.train import load
  cfg, params, tokenizer = load(workdir)
  return rate_policy(cfg, params, tokenizer, Rater.load(rater_workdir), **kwargs)
