"""Quantized (int8 / int4) or half-precision inference from a workdir, next to float32:
parameter bytes, validation perplexity, decode tokens/s at batch 1 and 32, samples.

  python -m experiments.quantized_inference --workdir /tmp/gpt_tiny --quant int8
  python -m experiments.quantized_inference --workdir /tmp/gpt_tiny --quant int4 \
      --save_quantized /tmp/gpt_tiny_int4        # and later: --from_quantized /tmp/gpt_tiny_int4
"""

import dataclasses

from absl import flags, logging

from experiments import cli
from llm import data, train
from llm.config import ConfigError
from llm.inference import SamplingConfig
from llm.inference import quantize as quant_lib
from llm.inference.workdir import terminal_text

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by a training run.",
                               required=True)
_QUANT = flags.DEFINE_string("quant", "int8", f"One of {', '.join(quant_lib.MODES)}.")
_SAVE = flags.DEFINE_string("save_quantized", None, "Write the quantized params here.")
_FROM = flags.DEFINE_string("from_quantized", None,
                            "Restore params saved by --save_quantized instead of quantizing.")
_EVAL_ROWS = flags.DEFINE_integer("eval_rows", 64, "Validation rows for perplexity.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "Tokens per row when timing decode.")
_BATCHES = flags.DEFINE_list("batches", ["1", "32"], "Batch sizes to time decode at.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed decode calls per mode and batch.")
_PROMPT = flags.DEFINE_multi_string("prompt", ["The ", "Return the"], "Sample prompts.")


@cli.one_line_errors
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  mode = quant_lib.check_mode(_QUANT.value)
  cfg, params, tokenizer = train.load(_WORKDIR.value)
  if cfg.model.family != "decoder":
    raise ConfigError(f"--workdir {_WORKDIR.value} holds a {cfg.model.family} model; this "
                      "entry point decodes, so give it a decoder's workdir")
  if _FROM.value:
    quantized = quant_lib.restore(_FROM.value, mode)
  else:
    quantized = quant_lib.quantize_params(params, mode)
  if _SAVE.value:
    quant_lib.save(_SAVE.value, quantized, mode)
  rows = data.build_dataset(cfg.data, tokenizer, cfg.data.eval_split)
  rows = {k: v[:_EVAL_ROWS.value] for k, v in rows.items()}
  trees = {"none": params, mode: quantized}
  report = quant_lib.compare_modes(cfg.model, trees, rows, new_tokens=_NEW_TOKENS.value,
                                   batches=[int(b) for b in _BATCHES.value],
                                   repeats=_REPEATS.value)
  print(quant_lib.format_report(report))

  sampling = SamplingConfig(temperature=0.0, max_new_tokens=24, eos_id=tokenizer.eos_id)
  for name, tree in trees.items():
    run_cfg = dataclasses.replace(cfg, model=quant_lib.inference_config(cfg.model, name))
    texts = train.sample_texts(run_cfg, tree, tokenizer, _PROMPT.value, sampling)
    for prompt, text in zip(_PROMPT.value, texts):
      print(f"[{name}] " + terminal_text(f"{prompt}{text}".replace("\n", "\\n")))


if __name__ == "__main__":
  cli.run(main)
