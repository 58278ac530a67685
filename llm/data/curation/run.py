"""Running a filter chain over a corpus: shards, local worker processes, resuming.

The input is cut into shards of `shard_docs` documents. The chain runs in phases: a
run of document filters is one phase (each shard on its own), and each corpus filter
(deduplication) is one (keys per shard in parallel, then one selection in corpus
order). Every (phase, shard) result is written atomically under `OUTPUT/work/`, so a
run that is stopped resumes where it was, and the result does not depend on the
number of processes. The kept documents end as `OUTPUT/shard-XXXXX-of-YYYYY.jsonl`
({"text", "id", "labels"}: the data pipeline reads them as `jsonl:OUTPUT/shard-*.jsonl`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import pathlib
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from llm.config import ConfigError, DataConfig
from llm.data import cache, corpus, sources
from llm.data.curation import report as report_lib
from llm.data.curation.registry import FILTERS, CurationConfig

_VERSION = 1  # bump when outputs change meaning, so old work is not resumed
MANIFEST = "manifest.json"
WORK = "work"


# --- input -----------------------------------------------------------------------

def _input_files(spec: str) -> tuple[str, list[str]]:
  try:
    kind, arg = sources.parse_source(spec)
    if kind == "tfds":
      raise sources.DataError("tfds is not read here; export it to JSONL first")
    paths = [] if kind == "embedded" else sources.resolve_paths(DataConfig(source=spec), arg)
  except sources.DataError as e:
    raise ConfigError(f"--input {spec}: {str(e).split(': ', 1)[-1]}") from None
  return kind, paths


def _records(spec: str, cfg: CurationConfig) -> Iterator[dict]:
  """{"id", "text", "labels"} of every input document in order (labels None if unknown)."""
  kind, paths = _input_files(spec)
  if kind == "embedded":
    texts = ((t, None) for t in corpus.embedded_documents("train"))
  elif kind == "text":
    texts = ((t, None) for p in paths for t in sources.text_file_documents(p, cfg.encoding))
  else:
    texts = (_jsonl_text(p, n, r, cfg) for p in paths
             for n, r in sources.jsonl_values(p, cfg.encoding))
  try:
    for i, (text, labels) in enumerate(texts):
      yield {"id": i, "text": text, "labels": labels}
  except sources.DataError as e:  # the reader names the training config's field
    raise ConfigError(str(e).replace("config.data.encoding", "config.encoding")) from None


def _jsonl_text(path: str, number: int, record, cfg: CurationConfig):
  if not isinstance(record, dict) or not isinstance(record.get(cfg.text_key), str):
    raise ConfigError(f"{path}:{number}: no string under config.text_key={cfg.text_key!r}")
  labels = record.get(cfg.label_key)
  return record[cfg.text_key], (list(labels) if isinstance(labels, list) else None)


# --- the output directory ----------------------------------------------------------

def _fingerprint(cfg: CurationConfig, spec: str) -> str:
  _, paths = _input_files(spec)
  stats = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
  extra = corpus.version_key() if spec == "embedded" else None
  return cache.fingerprint(_VERSION, cfg.to_dict(), spec, stats, extra)


def _claim(output: pathlib.Path, cfg: CurationConfig, spec: str) -> None:
  """Starts or resumes a run in `output`; refuses a directory holding anything else."""
  _, paths = _input_files(spec)
  for p in paths:
    if pathlib.Path(p).resolve().is_relative_to(output.resolve()):
      raise ConfigError(f"--output {output} contains the input file {p}; write elsewhere "
                        "(inputs are never modified)")
  fingerprint = _fingerprint(cfg, spec)
  manifest = output / MANIFEST
  if manifest.exists():
    saved = cache.read_json(manifest) or {}
    if saved.get("fingerprint") != fingerprint:
      raise ConfigError(f"--output {output} holds the shards of another run (other input or "
                        "config); give a new --output or delete that directory")
    return
  if output.exists() and any(output.iterdir()):
    raise ConfigError(f"--output {output} is not empty and holds no curation run; give a new "
                      "or empty directory")
  output.mkdir(parents=True, exist_ok=True)
  cache.write_json(manifest, {"fingerprint": fingerprint, "input": spec,
                              "config": cfg.to_dict()})


def _read_jsonl(path) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path, records: Sequence[dict]) -> None:
  cache.atomic_write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                                                  for r in records), mode="w")


def _split_input(spec: str, cfg: CurationConfig, work: pathlib.Path) -> int:
  """Writes the input shards (once); returns their number."""
  done = cache.read_json(work / "input.json")
  if done is not None:
    return done["shards"]
  shards, batch = 0, []
  for record in _records(spec, cfg):
    batch.append(record)
    if len(batch) == cfg.shard_docs:
      _write_jsonl(work / f"p0-{shards:05d}.jsonl", batch)
      shards, batch = shards + 1, []
  if batch or shards == 0:
    _write_jsonl(work / f"p0-{shards:05d}.jsonl", batch)
    shards += 1
  cache.write_json(work / "input.json", {"shards": shards})
  return shards


# --- phases ------------------------------------------------------------------------

def phases(chain: Sequence[str]) -> list[tuple[str, ...]]:
  """Consecutive document filters grouped; each corpus filter alone."""
  out: list[tuple[str, ...]] = []
  for name in chain:
    if FILTERS[name].is_document_filter and out and FILTERS[out[-1][0]].is_document_filter:
      out[-1] = out[-1] + (name,)
    else:
      out.append((name,))
  return out


def _document_unit(args) -> None:
  """One shard through a phase of document filters (runs in a worker process)."""
  cfg, names, src, dst, stats_path = args
  stats = {name: report_lib.empty_stats() for name in names}
  kept = []
  for record in _read_jsonl(src):
    text = record["text"]
    for name in names:
      before = text
      text = FILTERS[name].apply(text, cfg.params_of(name))
      report_lib.count(stats[name], record, before, text, cfg.examples)
      if text is None:
        break
    if text is not None:
      kept.append({**record, "text": text})
  _write_jsonl(dst, kept)
  cache.write_json(stats_path, stats)


def _key_unit(args) -> None:
  cfg, name, src, dst = args
  params = cfg.params_of(name)
  keys = [FILTERS[name].key(r["text"], params) for r in _read_jsonl(src)]
  cache.atomic_write(dst, lambda f: np.save(f, np.asarray(keys)))


@contextlib.contextmanager
def _workers(processes: int, shards: int):
  """`run(fn, units)`: in one pool of worker processes for the whole run when more
  than one is useful, else in this process."""
  count = min(processes or os.cpu_count() or 1, shards)
  if count <= 1:
    yield lambda fn, units: [fn(unit) for unit in units]
    return
  # spawn, not fork: the caller may hold threads (JAX does), and fork would copy them.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(count, mp_context=context) as pool:
    yield lambda fn, units: list(pool.map(fn, units))


def _done(work: pathlib.Path, p: int, s: int) -> bool:
  return all((work / f"p{p}-{s:05d}.{kind}").exists() for kind in ("jsonl", "stats.json"))


def _corpus_phase(run, cfg, name, work, p, shards) -> None:
  files = lambda kind, s: work / f"p{p}-{s:05d}.{kind}"
  outputs = [files("jsonl", s) for s in range(shards)]
  if all(_done(work, p, s) for s in range(shards)):
    return
  src = lambda s: work / f"p{p - 1}-{s:05d}.jsonl"
  run(_key_unit, [(cfg, name, src(s), files("keys.npy", s)) for s in range(shards)
                  if not files("keys.npy", s).exists()])
  per_shard = [np.load(files("keys.npy", s), allow_pickle=False) for s in range(shards)]
  sizes = [len(k) for k in per_shard]
  nonempty = [k for k in per_shard if len(k)]
  keep = FILTERS[name].select(np.concatenate(nonempty) if nonempty else [], cfg.params_of(name))
  start = 0
  for s in range(shards):
    flags, start = keep[start:start + sizes[s]], start + sizes[s]
    stats, kept = report_lib.empty_stats(), []
    for record, flag in zip(_read_jsonl(src(s)), flags):
      report_lib.count(stats, record, record["text"], record["text"] if flag else None,
                       cfg.examples)
      if flag:
        kept.append(record)
    _write_jsonl(outputs[s], kept)
    cache.write_json(files("stats.json", s), {name: stats})


def curate(cfg: CurationConfig, spec: str, output: str | os.PathLike,
           targets: Optional[Mapping[str, Sequence[str]]] = None) -> dict:
  """Runs the chain on the documents of `spec` (text:, jsonl: or embedded) into `output`;
  returns the report (also written as OUTPUT/report.json and report.md). `targets`
  (filter -> the true labels it should catch) adds precision and recall when the input
  is labelled."""
  output = pathlib.Path(output)
  _claim(output, cfg, spec)
  work = output / WORK
  work.mkdir(exist_ok=True)
  shards = _split_input(spec, cfg, work)
  stages = phases(cfg.filters)
  with _workers(cfg.processes, shards) as run:
    for p, names in enumerate(stages, start=1):
      if FILTERS[names[0]].is_document_filter:
        run(_document_unit, [(cfg, names, work / f"p{p - 1}-{s:05d}.jsonl",
                              work / f"p{p}-{s:05d}.jsonl", work / f"p{p}-{s:05d}.stats.json")
                             for s in range(shards) if not _done(work, p, s)])
      else:
        _corpus_phase(run, cfg, names[0], work, p, shards)
  last = len(stages)
  for s in range(shards):
    final = output / f"shard-{s:05d}-of-{shards:05d}.jsonl"
    if not final.exists():
      _write_jsonl(final, _read_jsonl(work / f"p{last}-{s:05d}.jsonl"))
  per_shard = [[cache.read_json(work / f"p{p}-{s:05d}.stats.json") for s in range(shards)]
               for p in range(1, last + 1)]
  result = report_lib.build(cfg.filters, per_shard, spec, cfg.examples, targets)
  cache.write_json(output / "report.json", result)
  cache.atomic_write(output / "report.md", lambda f: f.write(report_lib.markdown(result)),
                     mode="w")
  return result


def kept_files(output: str | os.PathLike) -> list[str]:
  """The output shards of a finished run, in order."""
  return sorted(str(p) for p in pathlib.Path(output).glob("shard-*-of-*.jsonl"))


def source_of(output: str | os.PathLike) -> str:
  """The `config.data.source` that trains on a run's kept documents."""
  return f"jsonl:{os.path.join(str(output), 'shard-*.jsonl')}"
