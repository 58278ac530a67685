"""Per-step batch preparation on the host (MLM masks, span corruption, prefix-LM split),
JSON on stdout: milliseconds per 32 x 256 batch, best of `--repeats` (the old test's
< 10 ms bound, kept as a measurement rather than a test that flakes on a busy machine).

  python benchmarks/data_batches.py --repeats 20
"""

from __future__ import annotations

import argparse
import timeit

from common import json_stdout, setup_logging

import numpy as np

from llm.data import objectives as obj
from llm.data import packing

VOCAB, PAD, EOS, MASK, FIRST_WORD_ID = 1000, 0, 1, 4, 105
SENTINELS = list(range(5, 105))


def batch_functions(rng):
  tokens = rng.integers(FIRST_WORD_ID, VOCAB, (32, 256)).astype(np.int32)
  word_start = rng.random(tokens.shape) < 0.5
  mask = dict(mask_id=MASK, vocab_size=VOCAB, special_ids=[PAD, EOS, 2, 3, *SENTINELS])
  tokens_length, _ = obj.span_corruption_lengths(256)
  chunks = rng.integers(FIRST_WORD_ID, VOCAB, (32, tokens_length))
  rows = packing.pack_documents([rng.integers(FIRST_WORD_ID, VOCAB, 100)] * 90, 256)
  rows = {name: array[:32] for name, array in rows.items()}
  return {"mlm_mask": lambda: obj.mlm_mask(tokens, rng, **mask),
          "mlm_mask_whole_words": lambda: obj.mlm_mask(tokens, rng, **mask,
                                                       word_start_BT=word_start),
          "corrupt_spans": lambda: obj.corrupt_spans(chunks, rng, SENTINELS, EOS, PAD),
          "prefix_lm_split": lambda: obj.prefix_lm_split(rows, rng)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args()
  setup_logging()
  with json_stdout() as out:
    fns = batch_functions(np.random.default_rng(7))
    out.update(batch=[32, 256], repeats=args.repeats, ms_per_batch={
        name: 1e3 * min(timeit.repeat(fn, number=1, repeat=args.repeats))
        for name, fn in fns.items()})


if __name__ == "__main__":
  main()
