"""Samples from the latest checkpoint in a workdir.

  python -m experiments.generate --workdir /tmp/gpt_tiny --prompt "The " --max_new_tokens 32 \
      --temperature 0
"""

from absl import app, flags, logging

from experiments.common import one_line_errors
from llm import train
from llm.inference import SamplingConfig

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by a training run.",
                               required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", ["The "], "Prompt(s); repeat for a batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass to keep (1 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


@one_line_errors
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  sampling = SamplingConfig(temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                            top_p=_TOP_P.value, max_new_tokens=_MAX_NEW.value)
  cfg, params, tokenizer = train.load(_WORKDIR.value)
  sampling = SamplingConfig(**{**sampling.__dict__, "eos_id": tokenizer.eos_id})
  texts = train.sample_texts(cfg, params, tokenizer, _PROMPT.value, sampling, _SEED.value)
  for prompt, text in zip(_PROMPT.value, texts):
    print(f"{prompt}{text}")


if __name__ == "__main__":
  app.run(main)
