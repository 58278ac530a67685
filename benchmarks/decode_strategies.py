"""Decoding strategies side by side on one machine, JSON on stdout: speculative vs plain
greedy, prefix-cache hit vs miss, beam 4 vs greedy.

  # the target/draft pair, trained once (CPU minutes; kept out of git):
  python -m experiments.pretrain_clm --config configs/gpt.py:small --workdir /tmp/spec7_target \
      --config.model.vocab_size=4096 --config.data.seq_len=128 --config.data.batch_size=16 \
      --config.train.steps=400 --config.train.learning_rate=1.5e-3 --config.train.warmup_steps=40
  python -m experiments.pretrain_clm --config configs/gpt.py:tiny --workdir /tmp/spec7_draft \
      --config.data.tokenizer_path=/tmp/spec7_target/tokenizer.model --config.train.steps=600 \
      --config.model.d_model=64 --config.model.num_layers=1 --config.model.num_heads=2 \
      --config.model.num_kv_heads=2 --config.model.d_ff=256
  python -m experiments.distill --config configs/align.py:distill \
      --config.compress.teacher=/tmp/spec7_target --config.train.init_from=/tmp/spec7_draft \
      --workdir /tmp/spec7_draft_kd --config.data.seq_len=128 --config.data.batch_size=16 \
      --config.train.steps=400 --config.compress.distill_alpha=1.0 \
      --config.compress.distill_temperature=1.0
  python benchmarks/decode_strategies.py   # the defaults: /tmp/spec7_target, /tmp/spec7_draft_kd

The pair: a target whose batch-1 step is bound by reading its weights (12M params, 49 MB
in float32, as every real LLM's is), so scoring gamma + 1 tokens costs far less than
gamma + 1 steps; and a draft on the target's tokenizer shrunk to one narrow layer
(330k params), pretrained, then distilled from the target (pure KL at T = 1, as
DistillSpec does): what counts is how often it predicts the target's own argmax. Before
distillation the same draft agreed with the target on 22% of proposals (gamma 2), after
it on 66%. (A tiny target's step is bound by its ~150 kernel launches instead, so
scoring gamma + 1 tokens costs several single steps and speculation cannot pay.) Every
timing is the median of `--repeats` calls, the contenders interleaved; greedy outputs
are compared token for token.
"""

from __future__ import annotations

import argparse
import statistics

from common import best_and_median, interleaved, json_stdout, log, setup_logging, time_calls

import jax
import jax.numpy as jnp
import numpy as np

from llm import models, train
from llm.inference import (SamplingConfig, beam_search, build_prefix_cache, for_decoding,
                           generate_sequences, generate_with_prefix, speculative_generate)
from llm.inference.decode import decode_step, few_row_layout, prefill
from llm.inference.speculative import check_same_tokenizer, speculative_layout

PROMPTS = ["Return the", "The ", "A list of", "If the"]


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--target_workdir", default="/tmp/spec7_target")
  p.add_argument("--draft_workdir", default="/tmp/spec7_draft_kd")
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--gammas", default="2,3,4")
  p.add_argument("--prefix_len", type=int, default=192)
  p.add_argument("--requests", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5)
  return p.parse_args()


def forward_ms(module, params, prompt, k: int, cache_len: int, steps: int = 32,
               repeats: int = 9, options: tuple = ()) -> float:
  """Best ms of one decode_step appending k tokens at batch 1, inside a jitted loop (no
  dispatch), the row's end held fixed; the logits are summed so none is optimised away."""
  state = prefill(module, params, jnp.asarray([prompt], jnp.int32),
                  jnp.asarray([len(prompt)], jnp.int32), cache_len)
  tokens = jnp.ones((1, k), jnp.int32)

  def body(_, carry):
    total, state = carry
    logits, new = decode_step(module, params, state, tokens)
    return total + logits.sum(), new.replace(end_B=state.end_B)
  loop = jax.jit(lambda p, s: jax.lax.fori_loop(0, steps, body, (0.0, s))[0],
                 compiler_options=dict(options) or None)
  fn = lambda: jax.block_until_ready(loop(params, state))
  fn()
  return 1e3 * min(time_calls(fn, 1) for _ in range(repeats)) / steps


def round_costs(target, params, draft, draft_params, greedy_pair, options, prompt, gammas,
                new_tokens) -> dict:
  """What a speculative round is made of: gamma draft forwards (the first reads up to two
  tokens) and one target forward of gamma + 1 tokens, compiled as the speculative loop is
  (`few_row_layout`), next to a plain greedy step."""
  cache_len = len(prompt) + new_tokens  # the cache a generation of new_tokens holds
  ms = lambda module, p, k, opts=options: forward_ms(module, p, prompt, k, cache_len,
                                                     options=opts)
  out = {"target_1_token_ms": ms(*greedy_pair, 1, ()),  # as greedy runs it
         "draft_1_token_ms": ms(draft, draft_params, 1),
         "draft_2_tokens_ms": ms(draft, draft_params, 2)}
  for g in gammas:
    out[f"target_{g + 1}_tokens_ms"] = ms(target, params, g + 1)
  return out


def speculative_vs_greedy(target, params, draft, draft_params, ids, args) -> dict:
  """Greedy with the tied (`for_decoding`) params against speculative with the layout its
  loop wants (`speculative_layout`), each prepared once."""
  greedy_target, greedy_params = target, params
  gammas = [int(g) for g in args.gammas.split(",")]
  target, params, draft, draft_params, options = speculative_layout(
      target, params, draft, draft_params, batch=1, gamma=max(gammas))
  sampling = SamplingConfig(temperature=0, max_new_tokens=args.new_tokens)  # no EOS: all N
  rng = jax.random.PRNGKey(0)
  greedy = lambda: [generate_sequences(greedy_target, greedy_params, [p], sampling, rng)
                    for p in ids]
  spec = {g: (lambda g=g: [speculative_generate(target, params, draft, draft_params, [p],
                                                sampling, rng, gamma=g) for p in ids])
          for g in gammas}
  draft_alone = lambda: [generate_sequences(draft, draft_params, [p], sampling, rng) for p in ids]
  times = interleaved({"greedy": greedy, "draft_greedy": draft_alone,
                       **{f"speculative_gamma_{g}": spec[g] for g in gammas}}, args.repeats)
  want = [out.tokens for out in greedy()]
  result = {"prompts": len(ids), "batch": 1, "new_tokens": args.new_tokens}
  base = statistics.median(times["greedy"])
  for name, ts in times.items():
    result[name] = {**best_and_median(ts), "tokens_per_s": len(ids) * args.new_tokens /
                    statistics.median(ts), "speedup_vs_greedy": base / statistics.median(ts)}
  costs = round_costs(target, params, draft, draft_params, (greedy_target, greedy_params),
                      options, ids[0], gammas, args.new_tokens)
  result["forward_costs"] = costs
  for g in gammas:
    outs = spec[g]()
    rounds = sum(stats["rounds"] for _, stats in outs)
    parts_ms = (costs["draft_2_tokens_ms"] + (g - 1) * costs["draft_1_token_ms"]
                + costs[f"target_{g + 1}_tokens_ms"])
    round_ms = 1e3 * statistics.median(times[f"speculative_gamma_{g}"]) / rounds
    result[f"speculative_gamma_{g}"].update({
        "acceptance_rate": float(np.mean([stats["acceptance_rate"] for _, stats in outs])),
        "rounds": rounds, "tokens_per_round": len(ids) * args.new_tokens / rounds,
        # a round's time (prefill included, so an upper bound) against its forwards
        "ms_per_round": round_ms, "forwards_ms_per_round": parts_ms,
        "other_ms_per_round": round_ms - parts_ms,
        "same_tokens_as_greedy": all(np.array_equal(o.tokens, w)
                                     for (o, _), w in zip(outs, want))})
  return result


def prefix_hit_vs_miss(module, params, tokenizer, args) -> dict:
  text = " ".join(["Return the value of the attribute named in the string."] * 40)
  prefix = ([tokenizer.bos_id] + tokenizer.encode(text))[:args.prefix_len]
  suffixes = [tokenizer.encode(f" Example {i}: the") for i in range(args.requests)]
  sampling = SamplingConfig(temperature=0, max_new_tokens=16)
  rng = jax.random.PRNGKey(0)
  cache = build_prefix_cache(module, params, prefix)
  miss = lambda: generate_sequences(module, params, [prefix + s for s in suffixes], sampling, rng)
  hit = lambda: generate_with_prefix(module, params, cache, suffixes, sampling, rng)
  build = lambda: jax.block_until_ready(build_prefix_cache(module, params, prefix).state)
  times = interleaved({"miss": miss, "hit": hit, "build_prefix_cache": build}, args.repeats)
  med = {k: statistics.median(v) for k, v in times.items()}
  return {"prefix_len": len(prefix), "requests": args.requests, "new_tokens": 16,
          **{k: best_and_median(v) for k, v in times.items()},
          "hit_speedup": med["miss"] / med["hit"],
          "seconds_saved_per_batch": med["miss"] - med["hit"],
          "same_tokens": bool(np.array_equal(miss().tokens, hit().tokens))}


def beam_vs_greedy(module, params, ids, args) -> dict:
  sampling = SamplingConfig(temperature=0, max_new_tokens=32)
  rng = jax.random.PRNGKey(0)
  greedy = lambda: generate_sequences(module, params, ids, sampling, rng)
  beam_module, beam_params, _ = few_row_layout(module, params, rows=4 * len(ids))  # once
  beam4 = lambda: beam_search(beam_module, beam_params, ids, sampling, beams=4)
  times = interleaved({"greedy": greedy, "beam_4": beam4}, args.repeats)
  g, b = greedy(), beam4()
  return {"batch": len(ids), "new_tokens": 32,
          **{k: best_and_median(v) for k, v in times.items()},
          "beam_4_time_ratio": statistics.median(times["beam_4"]) /
                               statistics.median(times["greedy"]),
          "mean_sum_logprob": {"greedy": float(g.logprobs.sum(-1).mean()),
                               "beam_4_best": float(b.logprobs[:, 0].sum(-1).mean())}}


def main():
  args = parse_args()
  setup_logging()
  cfg, params, tokenizer = train.load(args.target_workdir)
  draft_cfg, draft_params, draft_tokenizer = train.load(args.draft_workdir)
  check_same_tokenizer(tokenizer, draft_tokenizer)
  # Once, as a server would: every strategy takes these as they are (`for_decoding` is
  # then a no-op), so the timings hold decoding, not per-call param relayout.
  target, params = for_decoding(models.build(cfg.model), params)
  draft, draft_params = for_decoding(models.build(draft_cfg.model), draft_params)
  ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in PROMPTS]
  count = lambda p: int(sum(x.size for x in jax.tree_util.tree_leaves(p)))
  with json_stdout() as result:
    result["pair"] = {"target_params": count(params), "draft_params": count(draft_params),
                      "target_workdir": args.target_workdir,
                      "draft_workdir": args.draft_workdir}
    log.info("speculative vs greedy")
    result["speculative_vs_greedy"] = speculative_vs_greedy(target, params, draft,
                                                            draft_params, ids, args)
    log.info("prefix cache")
    result["prefix_cache"] = prefix_hit_vs_miss(target, params, tokenizer, args)
    log.info("beam search")
    result["beam_vs_greedy"] = beam_vs_greedy(target, params, ids, args)
    result["jax_version"] = jax.__version__


if __name__ == "__main__":
  main()
