"""Samples from the latest checkpoint in a workdir (decoder or encoder-decoder).

  python -m experiments.generate --workdir /tmp/gpt_tiny --prompt "The " --max_new_tokens 32 \
      --temperature 0 --logprobs
  python -m experiments.generate --workdir /tmp/gpt_tiny --prompts_file prompts.txt --beams 4
  python -m experiments.generate --workdir /tmp/gpt_small --draft_workdir /tmp/gpt_tiny --quant int8

A decoder continues each prompt and never emits ids it was not trained to predict (pad,
`<mask>`, span sentinels); an encoder-decoder (T5) reads each prompt as its input.
"""

import jax
from absl import flags, logging

from experiments import cli
from llm.config import ConfigError, check_range
from llm.inference import (SamplingConfig, beam_search, generate_sequences,
                           speculative_generate, untrained_ids)
from llm.inference.speculative import check_same_tokenizer
from llm.inference.workdir import (continuation_text, load_model, prompt_ids, read_prompts,
                                   terminal_text)

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by a training run.",
                               required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", ["The "], "Prompt(s); repeat for a batch.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None,
                                    "A text file, one prompt per line (replaces --prompt).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass to keep (1 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_BEAMS = flags.DEFINE_integer("beams", 1, "Beam search with this many beams (1 = sample).")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 0.0,
                                     "Beam score = log p / ((5 + len) / 6) ** this.")
_DRAFT = flags.DEFINE_string("draft_workdir", None,
                             "Speculative decoding with this smaller model as the draft.")
_GAMMA = flags.DEFINE_integer("gamma", 4, "Draft tokens proposed per speculative round.")
_QUANT = flags.DEFINE_string("quant", "none", "Weights for inference: none|bf16|f16|int8|int4.")
_LOGPROBS = flags.DEFINE_boolean("logprobs", False, "Print each new token's log-probability.")


def run(module, params, tokenizer, ids, sampling, rng):
  """(generation, a note to print) with the strategy the flags pick."""
  if _DRAFT.value is not None:
    if _BEAMS.value != 1:
      raise ConfigError("--beams with --draft_workdir: speculative decoding samples; use one")
    draft, draft_params, draft_tokenizer = load_model(_DRAFT.value)
    check_same_tokenizer(tokenizer, draft_tokenizer)
    out, stats = speculative_generate(module, params, draft, draft_params, ids, sampling, rng,
                                      gamma=_GAMMA.value)
    return out, (f"# speculative: acceptance_rate={stats['acceptance_rate']:.3f} "
                 f"rounds={stats['rounds']}")
  if _BEAMS.value != 1:
    out = beam_search(module, params, ids, sampling, _BEAMS.value, _LENGTH_PENALTY.value)
    return out, None
  return generate_sequences(module, params, ids, sampling, rng), None


@cli.one_line_errors
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  SamplingConfig(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                 max_new_tokens=_MAX_NEW.value)  # bad flags fail before the restore
  check_range("--seed", _SEED.value, "[0, 2**32)")  # PRNGKey wraps larger seeds around
  if _QUANT.value != "none":
    from llm.inference.quantize import check_mode
    check_mode(_QUANT.value)
  prompts = read_prompts(_PROMPTS_FILE.value) if _PROMPTS_FILE.value else list(_PROMPT.value)
  module, params, tokenizer = load_model(_WORKDIR.value, _QUANT.value)
  seq2seq = module.cfg.family == "encoder_decoder"
  ids = prompt_ids(tokenizer, module.cfg.family, prompts)
  sampling = SamplingConfig(temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                            top_p=_TOP_P.value, max_new_tokens=_MAX_NEW.value,
                            eos_id=tokenizer.eos_id,
                            suppress_ids=() if seq2seq else untrained_ids(tokenizer))
  out, note = run(module, params, tokenizer, ids, sampling, jax.random.PRNGKey(_SEED.value))
  if note:
    print(note)
  beams = out.tokens.ndim == 3
  for row, (prompt, ids_of_prompt, new) in enumerate(zip(prompts, ids, out.lists())):
    print(terminal_text(f"{prompt} -> {tokenizer.decode(new)}" if seq2seq
                        else f"{prompt}{continuation_text(tokenizer, ids_of_prompt, new)}"))
    if _LOGPROBS.value:
      logprobs = out.logprobs[row, 0] if beams else out.logprobs[row]
      for token, logp in zip(new, logprobs.tolist()):
        print(f"  {token}\t{tokenizer.id_to_piece(token)!r}\t{logp:.4f}")
      score = f" beam_score={out.scores[row, 0]:.4f}" if beams else ""
      print(f"  sum_logprob={sum(logprobs[:len(new)].tolist()):.4f}{score}")


if __name__ == "__main__":
  cli.run(main)
