"""Resident memory of the data pipeline as the corpus grows 10x: streamed
(`config.data.streaming=True`) against the in-memory packing of the whole split. JSON on
stdout: for a fresh process per (mode, corpus size), its peak RSS in MiB and how far that
rose above the peak after its imports, with the seconds each took.

  python benchmarks/streaming_memory.py --mib 2 --batches 200
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

from common import json_stdout, setup_logging

SEQ_LEN, BATCH = 128, 16


def write_corpus(directory: str, mib: float, shards: int = 4, seed: int = 0):
  """JSONL shards of `mib` MiB in all: documents of random pseudo-words."""
  rng = random.Random(seed)
  words = ["".join(rng.choice("abcdefghijklmnoprstuvwy") for _ in range(rng.randint(2, 9)))
           for _ in range(5000)]
  os.makedirs(directory, exist_ok=True)
  per_shard = int(mib * 2**20 / shards)
  for s in range(shards):
    with open(os.path.join(directory, f"part-{s:03d}.jsonl"), "w", encoding="utf-8") as f:
      written = 0
      while written < per_shard:
        line = json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(20, 400)))}) + "\n"
        f.write(line)
        written += len(line)


def measure(mode: str, directory: str, tokenizer: str, batches: int) -> dict:
  """In this process: peak RSS growth (MiB) while the pipeline yields `batches` batches."""
  from llm.config import DataConfig
  from llm.data import Tokenizer, pipeline, train_batches
  from llm.data.source_mixture import rows
  tok = Tokenizer.load(tokenizer)
  cfg = DataConfig(source=f"jsonl:{directory}/*.jsonl", seq_len=SEQ_LEN, batch_size=BATCH,
                   streaming=mode == "streaming")
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  start = time.perf_counter()
  iterator = train_batches(rows(pipeline.packed_lm_rows, cfg, tok, "train"), BATCH, 0)
  for _ in range(batches):
    next(iterator)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {"rss_growth_mib": round(peak - base, 1), "peak_rss_mib": round(peak, 1),
          "seconds": round(time.perf_counter() - start, 2)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mib", type=float, default=2.0, help="size of the 1x corpus")
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--child", nargs=3, metavar=("MODE", "DIR", "TOKENIZER"), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(measure(*args.child, args.batches)))
    return
  setup_logging()
  with json_stdout() as out, tempfile.TemporaryDirectory() as tmp:
    from llm.data import train_tokenizer
    from llm.data.streaming import documents
    from llm.config import DataConfig
    for scale in (1, 10):
      write_corpus(os.path.join(tmp, f"x{scale}"), args.mib * scale)
    sample = documents(DataConfig(source=f"jsonl:{tmp}/x1/*.jsonl", streaming=True), "train",
                       2_000_000)
    tokenizer = os.path.join(tmp, "tokenizer.model")
    train_tokenizer(sample, 2048, tokenizer, 0)
    results = {}
    for mode in ("streaming", "in_memory"):
      for scale in (1, 10):
        child = subprocess.run(
            [sys.executable, __file__, "--batches", str(args.batches), "--child", mode,
             os.path.join(tmp, f"x{scale}"), tokenizer], capture_output=True, text=True,
            check=True, env={**os.environ, "LLM_CACHE": os.path.join(tmp, "cache")})
        results[f"{mode}/x{scale}"] = json.loads(child.stdout.strip().splitlines()[-1])
    out.update(corpus_mib={"x1": args.mib, "x10": 10 * args.mib}, seq_len=SEQ_LEN,
               batch=BATCH, batches=args.batches, load_average=os.getloadavg()[0],
               results=results)


if __name__ == "__main__":
  main()
