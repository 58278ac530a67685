"""Span-corruption pretraining of an encoder-decoder (T5).

  python -m experiments.pretrain_t5 --config configs/t5.py:tiny --workdir /tmp/t5_tiny

Trains on the embedded corpus by default, prints the final losses, and shows the model
filling in the sentinel spans of a few validation inputs.
"""

import json

import jax
from absl import flags

from experiments import cli
from experiments.common import start
from llm import models, objectives, train
from llm.inference import SamplingConfig, generate_seq2seq

_CONFIG = cli.ConfigFlag("configs/t5.py:tiny")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, tokenizer go here.",
                               required=True)


@cli.one_line_errors
def main(argv):
  del argv
  cfg = start(_CONFIG.value)
  last = train.run(cfg, _WORKDIR.value)
  print(json.dumps({k: last.get(k) for k in ("step", "train_loss", "eval_loss",
                                             "eval_accuracy", "tokens_per_s")}))
  _, params, tokenizer = train.load(_WORKDIR.value)
  span = objectives.get("span")
  rows = span.rows(cfg, tokenizer, cfg.data.eval_split)
  batch = span.batches(cfg, tokenizer)({"chunks": rows["chunks"][:2]}, 0)
  inputs = [[t for t in row if t != tokenizer.pad_id] for row in batch["encoder_inputs"]]
  outs = generate_seq2seq(models.build(cfg.model), params, inputs,
                          SamplingConfig(temperature=0, max_new_tokens=cfg.train.sample_tokens,
                                         eos_id=tokenizer.eos_id), jax.random.PRNGKey(0))
  for source, out in zip(inputs, outs):
    print(f"--- input: {tokenizer.decode(source)[:200]!r}\n    spans: {_spans(out, tokenizer)}")


def _spans(ids, tokenizer):
  """'<0> text <1> text ...': each sentinel followed by the span the model filled in."""
  sentinels = {s: i for i, s in enumerate(tokenizer.sentinel_ids)}
  parts, span = [], []
  for token in ids + [tokenizer.sentinel_ids[0]]:
    if token in sentinels:
      if parts or span:
        parts[-1:] = [f"{parts[-1] if parts else ''} {tokenizer.decode(span)!r}"]
      parts.append(f"<{sentinels[token]}>")
      span = []
    else:
      span.append(token)
  return " ".join(parts[:-1])


if __name__ == "__main__":
  cli.run(main, _CONFIG)
