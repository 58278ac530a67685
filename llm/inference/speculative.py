"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023), batched and jitted.

Each round a small draft model proposes `gamma` tokens one at a time; the target scores
them all in one forward pass of gamma + 1 tokens. Draft token i is kept with probability
min(1, p(x_i) / q(x_i)) (p, q: the target's and draft's sampling distributions); at the
first rejection a token is drawn from norm(max(0, p - q)), and when all are kept, from
the target's next distribution. The emitted tokens are distributed exactly as the
target's own samples. Greedy is the case where p and q are point masses: the output is
the target's greedy output token for token.

Rows keep different numbers of tokens; each model's state is then cut back per row
(`truncate_rows`). The last emitted token of a round is "pending": in neither cache,
it is the first token both models read next round. When a row kept all gamma draft
tokens the draft has not read the last of them, so next round it reads two.

On CPU, with up to `decode.FEW_ROWS` target tokens per round (all rows), the loop
compiles with XLA's own single-threaded dots instead of YNNPACK's
(`decode.few_row_layout`): the (gamma + 1)-row verify then costs 1.1-1.4x a one-token
step instead of about 1.6x (benchmarks/decode_strategies.py).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.config import ConfigError
from llm.inference.decode import (decode_step, few_row_layout, for_decoding, jit_with, prefill,
                                  truncate_rows)
from llm.inference.generate import Generation, prompt_inputs, to_generation
from llm.inference.sampling import (SamplingConfig, draw, greedy_tokens, sample,
                                    sampling_logits, token_logprobs)


def check_draft(target_cfg, draft_cfg, gamma: int) -> None:
  if gamma < 1:
    raise ConfigError(f"gamma={gamma}: must be >= 1 (draft tokens proposed per round)")
  if draft_cfg.vocab_size != target_cfg.vocab_size or draft_cfg.family != target_cfg.family:
    raise ConfigError(
        f"draft model (family={draft_cfg.family}, vocab_size={draft_cfg.vocab_size}) does not "
        f"match the target (family={target_cfg.family}, vocab_size={target_cfg.vocab_size}); "
        "train the draft with the target's tokenizer and vocabulary")


def check_same_tokenizer(target_tokenizer, draft_tokenizer) -> None:
  """The draft must split text into the same ids as the target."""
  pieces = lambda t: [t.id_to_piece(i) for i in range(t.vocab_size)]
  if pieces(target_tokenizer) != pieces(draft_tokenizer):
    raise ConfigError("--draft_workdir: its tokenizer differs from the target's; train the "
                      "draft with --config.data.tokenizer_path set to the target's tokenizer")


def _draft(draft, draft_params, state, first_BK, first_len_B, rng, sampling, gamma):
  """gamma draft tokens (B, gamma) and the draft's distributions they came from (greedy:
  None; the tokens are argmaxes, no random draws or vocabulary-wide softmax needed)."""
  def first_step(k):  # reads the first k columns (rows then hold min(k, first_len_B) tokens)
    return lambda st: decode_step(draft, draft_params, st, first_BK[:, :k],
                                  jnp.minimum(first_len_B, k))[1]
  # Two tokens only when some row kept all of last round's draft: a 1-token step is cheaper.
  state = jax.lax.cond(jnp.any(first_len_B > 1), first_step(2), first_step(1), state)

  def propose(state, rng):
    if sampling.greedy:
      return greedy_tokens(state.logits_BV, sampling), None
    q_BV = jax.nn.softmax(sampling_logits(state.logits_BV, sampling), axis=-1)
    return draw(rng, q_BV), q_BV

  def step(carry, rng):
    state, x_B = carry
    _, state = decode_step(draft, draft_params, state, x_B[:, None])
    x_B, q_BV = propose(state, rng)
    return (state, x_B), (x_B, q_BV)

  rngs = jax.random.split(rng, gamma) if rng is not None else [None] * gamma
  x_B, q_BV = propose(state, rngs[0])
  xs, qs = [x_B], [q_BV]
  for i in range(1, gamma):  # unrolled: gamma is a small static int; one straight-line round
    (state, x_B), (x_B, q_BV) = step((state, x_B), rngs[i])
    xs.append(x_B)
    qs.append(q_BV)
  q_BGV = None if sampling.greedy else jnp.stack(qs, axis=1)
  return state, jnp.stack(xs, axis=1), q_BGV


def _verify_greedy(target_logits_BKV, x_BG, sampling):
  """Greedy acceptance: draft tokens survive while they equal the target's argmax."""
  b, k, v = target_logits_BKV.shape
  best_BK = greedy_tokens(target_logits_BKV.reshape(b * k, v), sampling).reshape(b, k)
  kept_B = jnp.sum(jnp.cumprod(best_BK[:, :-1] == x_BG, axis=1), axis=1)
  return kept_B, jnp.take_along_axis(best_BK, kept_B[:, None], axis=1)[:, 0]


def _verify(target_logits_BKV, x_BG, q_BGV, rng, sampling):
  """(kept_B, next_B): how many draft tokens survive, and the token drawn after them."""
  if sampling.greedy:
    return _verify_greedy(target_logits_BKV, x_BG, sampling)
  b, g = x_BG.shape
  p_BKV = jax.vmap(lambda l: jax.nn.softmax(sampling_logits(l, sampling), axis=-1),
                   in_axes=1, out_axes=1)(target_logits_BKV)
  pick = lambda probs_BGV: jnp.take_along_axis(probs_BGV, x_BG[..., None], axis=-1)[..., 0]
  accept_rng, next_rng = jax.random.split(rng)
  ratio_BG = pick(p_BKV[:, :g]) / pick(q_BGV)
  accept_BG = jax.random.uniform(accept_rng, (b, g)) < ratio_BG
  kept_B = jnp.sum(jnp.cumprod(accept_BG, axis=1), axis=1)
  # After a rejection at i: norm(max(0, p_i - q_i)); after all gamma: p_gamma (q = 0).
  q_BKV = jnp.concatenate([q_BGV, jnp.zeros_like(q_BGV[:, :1])], axis=1)
  at = lambda x_BKV: jnp.take_along_axis(x_BKV, kept_B[:, None, None], axis=1)[:, 0]
  residual_BV = jnp.maximum(at(p_BKV) - at(q_BKV), 0.0)
  residual_BV = jnp.where(residual_BV.sum(-1, keepdims=True) > 0, residual_BV, at(p_BKV))
  next_B = draw(next_rng, residual_BV)
  return kept_B, next_B


_STATIC = ("target", "draft", "sampling", "gamma", "cache_len")


def _speculative(target, params, draft, draft_params, inputs: dict, rng,
                 sampling: SamplingConfig, gamma: int, cache_len: int):
  t_state = prefill(target, params, cache_len=cache_len, **inputs)
  d_state = prefill(draft, draft_params, cache_len=cache_len, **inputs)
  b, n = t_state.end_B.shape[0], sampling.max_new_tokens
  width = n + gamma + 2  # room for a round's overflow; the last column takes masked writes
  eos = -1 if sampling.eos_id is None else sampling.eos_id
  rng, first_rng = jax.random.split(rng)
  pending_B, logp_B = sample(first_rng, t_state.logits_BV, sampling)
  tokens_BM = jnp.zeros((b, width), jnp.int32).at[:, 0].set(pending_B)
  logps_BM = jnp.zeros((b, width)).at[:, 0].set(logp_B)
  done_B = (pending_B == eos) | (n == 1)
  zeros_B = jnp.zeros((b,), jnp.int32)
  carry = (t_state, d_state, pending_B, zeros_B, zeros_B.astype(bool), tokens_BM, logps_BM,
           jnp.ones((b,), jnp.int32), done_B, rng, jnp.int32(0), jnp.int32(0))

  def body(carry):
    (t_state, d_state, pending_B, backlog_B, full_B, tokens_BM, logps_BM, count_B, done_B,
     rng, kept_total, rounds) = carry
    if sampling.greedy:  # no random draws at all
      draft_rng = verify_rng = None
    else:
      rng, draft_rng, verify_rng = jax.random.split(rng, 3)
    first_BK = jnp.where(full_B[:, None], jnp.stack([backlog_B, pending_B], 1),
                         jnp.stack([pending_B, zeros_B], 1))
    d_end_B = d_state.end_B + full_B + 1
    d_state, x_BG, q_BGV = _draft(draft, draft_params, d_state, first_BK,
                                  full_B.astype(jnp.int32) + 1, draft_rng, sampling, gamma)
    t_end_B = t_state.end_B
    logits_BKV, t_state = decode_step(target, params, t_state,
                                      jnp.concatenate([pending_B[:, None], x_BG], axis=1))
    kept_B, next_B = _verify(logits_BKV, x_BG, q_BGV, verify_rng, sampling)
    kept_B = jnp.where(done_B, 0, kept_B)
    # This round emits x_1 .. x_kept, then next.
    j_K = jnp.arange(gamma + 1)[None]
    x_BK = jnp.concatenate([x_BG, zeros_B[:, None]], axis=1)
    emit_BK = jnp.where(j_K < kept_B[:, None], x_BK, next_B[:, None])
    logp_BK = jax.vmap(token_logprobs, in_axes=(1, 1), out_axes=1)(logits_BKV, emit_BK)
    write_BK = (j_K <= kept_B[:, None]) & ~done_B[:, None]
    cols_BK = jnp.where(write_BK, count_B[:, None] + j_K, width - 1)
    rows_BK = jnp.broadcast_to(jnp.arange(b)[:, None], cols_BK.shape)
    tokens_BM = tokens_BM.at[rows_BK, cols_BK].set(jnp.where(write_BK, emit_BK, 0))
    logps_BM = logps_BM.at[rows_BK, cols_BK].set(jnp.where(write_BK, logp_BK, 0.0))
    hit_eos_B = jnp.any(write_BK & (emit_BK == eos), axis=1)
    # Keep pending + kept tokens in the target, as many as it read in the draft; a row
    # that was already done stays where it was.
    new_t_end_B = jnp.where(done_B, t_end_B, t_end_B + 1 + kept_B)
    new_d_end_B = jnp.where(done_B, d_state.end_B - gamma - full_B,
                            d_end_B + jnp.minimum(kept_B, gamma - 1))
    t_logits_BV = jnp.take_along_axis(logits_BKV, kept_B[:, None, None], axis=1)[:, 0]
    t_state = truncate_rows(t_state, new_t_end_B, jnp.where(done_B[:, None], t_state.logits_BV,
                                                            t_logits_BV))
    d_state = truncate_rows(d_state, new_d_end_B, d_state.logits_BV)
    live = ~done_B
    count_B = jnp.where(live, count_B + kept_B + 1, count_B)
    return (t_state, d_state, jnp.where(live, next_B, pending_B), x_BG[:, -1],
            live & (kept_B == gamma), tokens_BM, logps_BM, count_B,
            done_B | hit_eos_B | (count_B >= n), rng, kept_total + jnp.sum(kept_B),
            rounds + jnp.sum(live))

  out = jax.lax.while_loop(lambda c: ~jnp.all(c[8]), body, carry)
  tokens_BM, logps_BM, kept_total, rounds = out[5], out[6], out[10], out[11]
  return tokens_BM[:, :n], logps_BM[:, :n], kept_total, rounds


def speculative_layout(target, params, draft, draft_params, batch: int, gamma: int):
  """(target, params, draft, draft_params, compiler options) as the loop runs them, for
  models already `for_decoding`: one compile for both, so the draft's dots (up to 2 tokens
  a row) take the target's options too, or both keep the defaults (a quantized draft)."""
  laid_target, laid_params, options = few_row_layout(target, params, rows=batch * (gamma + 1))
  if options:
    laid_draft, laid_draft_params, options = few_row_layout(draft, draft_params, rows=2 * batch)
  if not options:
    return target, params, draft, draft_params, ()
  return laid_target, laid_params, laid_draft, laid_draft_params, options


def speculative_generate(target: nn.Module, params, draft: nn.Module, draft_params,
                         prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                         rng: jax.Array, gamma: int = 4, pad_id: int = 0,
                         start_id: int = 0) -> tuple[Generation, dict]:
  """The target's generation, sped up by `draft` proposing `gamma` tokens per round.

  Returns the generation and {"acceptance_rate": kept / proposed draft tokens,
  "rounds": target forwards summed over rows}.
  """
  check_draft(target.cfg, draft.cfg, gamma)
  inputs, cache_len = prompt_inputs(target.cfg, prompts, sampling.max_new_tokens, pad_id,
                                    start_id)
  prompt_inputs(draft.cfg, prompts, sampling.max_new_tokens, pad_id, start_id)
  target, params, draft, draft_params, options = speculative_layout(
      *for_decoding(target, params), *for_decoding(draft, draft_params),
      batch=len(prompts), gamma=gamma)
  loop = jit_with(_speculative, options, _STATIC)
  tokens, logps, kept, rounds = loop(target, params, draft, draft_params, inputs, rng,
                                     sampling, gamma, cache_len + gamma + 1)
  rounds = int(rounds)
  stats = {"acceptance_rate": int(kept) / max(1, rounds * gamma), "rounds": rounds}
  return to_generation(tokens, logps, sampling.eos_id), stats
