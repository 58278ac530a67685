"""Beam search with a length penalty and per-beam EOS, batched and jitted.

Each prompt keeps `beams` hypotheses as rows of one decode state (B * W rows). A step
scores every one-token extension of every live beam; a finished beam competes as
itself, unchanged. The W best candidates by length-penalised score survive, and the
state's rows are gathered to their parents before the chosen tokens are appended.

score = sum of log p_model / ((5 + length) / 6) ** length_penalty (GNMT; 0 = plain sum).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm.config import ConfigError
from llm.inference.decode import (decode_step, few_row_layout, for_decoding, gather_rows,
                                  jit_with, prefill)
from llm.inference.generate import Generation, prompt_inputs, to_generation
from llm.inference.sampling import SamplingConfig, suppress


def length_normalizer(length, length_penalty: float):
  return ((5.0 + length) / 6.0) ** length_penalty


def _select(logits_BWV, sums_BW, scores_BW, finished_BW, length, length_penalty, eos,
            suppress_ids):
  """One beam step: (parent_BW, token_BW, token_logp_BW, sums_BW, scores_BW, finished_BW)."""
  b, w, v = logits_BWV.shape
  raw_BWV = jax.nn.log_softmax(logits_BWV, axis=-1)
  allowed_V = suppress(jnp.zeros((1, v)), suppress_ids)[0] == 0
  cand_BWV = jnp.where(allowed_V, sums_BW[..., None] + raw_BWV, -jnp.inf)
  # A finished beam survives as one candidate (token 0, its own score).
  stay_BWV = jnp.where(jnp.arange(v) == 0, scores_BW[..., None], -jnp.inf)
  key_BWV = jnp.where(finished_BW[..., None], stay_BWV,
                      cand_BWV / length_normalizer(length, length_penalty))
  scores_BW, flat_BW = jax.lax.top_k(key_BWV.reshape(b, w * v), w)
  parent_BW, token_BW = flat_BW // v, flat_BW % v
  was_finished_BW = jnp.take_along_axis(finished_BW, parent_BW, axis=1)
  token_BW = jnp.where(was_finished_BW, 0, token_BW)
  logp_BW = jnp.where(was_finished_BW, 0.0,
                      jnp.take_along_axis(raw_BWV.reshape(b, w * v), flat_BW, axis=1))
  sums_BW = jnp.take_along_axis(sums_BW, parent_BW, axis=1) + logp_BW
  return parent_BW, token_BW, logp_BW, sums_BW, scores_BW, was_finished_BW | (token_BW == eos)


_STATIC = ("module", "sampling", "beams", "length_penalty", "cache_len")


def _beam_search(module, params, inputs: dict, sampling: SamplingConfig, beams: int,
                 length_penalty: float, cache_len: int):
  state = prefill(module, params, cache_len=cache_len, **inputs)
  b, w, n = state.end_B.shape[0], beams, sampling.max_new_tokens
  state = gather_rows(state, jnp.repeat(jnp.arange(b), w))
  eos = -1 if sampling.eos_id is None else sampling.eos_id
  # Only beam 0 is live at first: the others are copies and must not be chosen twice.
  sums_BW = jnp.where(jnp.arange(w) == 0, 0.0, -jnp.inf) * jnp.ones((b, 1))
  carry = (jnp.int32(0), state, sums_BW, jnp.full((b, w), -jnp.inf), jnp.zeros((b, w), bool),
           jnp.zeros((b, w, n), jnp.int32), jnp.zeros((b, w, n), jnp.float32))

  def cond(carry):
    i, *_, finished_BW, _, _ = carry
    return (i < n) & ~jnp.all(finished_BW)

  def body(carry):
    i, state, sums_BW, scores_BW, finished_BW, tokens_BWN, logps_BWN = carry
    parent_BW, token_BW, logp_BW, sums_BW, scores_BW, finished_BW = _select(
        state.logits_BV.reshape(b, w, -1), sums_BW, scores_BW, finished_BW, i + 1,
        length_penalty, eos, sampling.suppress_ids)
    reorder = lambda x_BWN: jnp.take_along_axis(x_BWN, parent_BW[..., None], axis=1)
    tokens_BWN = reorder(tokens_BWN).at[:, :, i].set(token_BW)
    logps_BWN = reorder(logps_BWN).at[:, :, i].set(logp_BW)
    state = gather_rows(state, (parent_BW + w * jnp.arange(b)[:, None]).reshape(-1))
    _, state = decode_step(module, params, state, token_BW.reshape(-1, 1))
    return i + 1, state, sums_BW, scores_BW, finished_BW, tokens_BWN, logps_BWN

  _, _, _, scores_BW, _, tokens_BWN, logps_BWN = jax.lax.while_loop(cond, body, carry)
  return tokens_BWN, logps_BWN, scores_BW  # top_k leaves the beams sorted, best first


def beam_search(module: nn.Module, params, prompts: Sequence[Sequence[int]],
                sampling: SamplingConfig, beams: int, length_penalty: float = 0.0,
                pad_id: int = 0, start_id: int = 0) -> Generation:
  """The `beams` best continuations of each prompt, best first ((B, W, N) arrays, with
  `scores`). From `sampling` it uses max_new_tokens, eos_id and suppress_ids; beam
  search is deterministic, so temperature and filters do not apply."""
  if beams < 1:
    raise ConfigError(f"beams={beams}: must be >= 1 (1 = greedy)")
  inputs, cache_len = prompt_inputs(module.cfg, prompts, sampling.max_new_tokens, pad_id,
                                    start_id)
  module, params, options = few_row_layout(*for_decoding(module, params),
                                           rows=len(prompts) * beams)
  tokens, logps, scores = jit_with(_beam_search, options, _STATIC)(
      module, params, inputs, sampling, beams, float(length_penalty), cache_len)
  return to_generation(tokens, logps, sampling.eos_id, scores)
