"""Streaming data (`config.data.streaming`): memory stays flat as the corpus grows,
resume yields the very next batches, processes read disjoint files, bad files fail by
name and line, and a streamed run resumes through the train loop's checkpoint."""

import dataclasses
import itertools
import json
import os
import random
import tracemalloc

import jax
import orbax.checkpoint as ocp
import numpy as np
import pytest

from llm.config import ConfigError, DataConfig
from llm.data import DataError, corpus, pipeline, sources, streaming, train_batches
from llm.data import train_tokenizer
from llm.data.source_mixture import rows as objective_rows
from tests import test_train
from tests.helpers import prepare_text_tfds

_LETTERS = random.Random(1)
WORDS = ["".join(_LETTERS.choice("abcdefghijklmnoprstuvwy") for _ in range(_LETTERS.randint(2, 8)))
         for _ in range(600)]
SEQ_LEN, BATCH = 32, 4


def write_shards(directory, num_files, docs_per_file, seed=0):
  """JSONL shards of random word documents; returns the documents per file."""
  rng = random.Random(seed)
  os.makedirs(directory, exist_ok=True)
  per_file = []
  for f in range(num_files):
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40)))
            for _ in range(docs_per_file)]
    with open(os.path.join(directory, f"part-{f:03d}.jsonl"), "w", encoding="utf-8") as fh:
      fh.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    per_file.append(docs)
  return per_file


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  # the vocabulary of tests/test_train.py's model, whose compiled steps the run below shares
  return train_tokenizer([" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, 600, 50)],
                         test_train.MODEL["vocab_size"], path, 8)


def stream_cfg(directory, **overrides):
  return DataConfig(**{"source": f"jsonl:{directory}/*.jsonl", "seq_len": SEQ_LEN,
                       "batch_size": BATCH, "streaming": True, "shuffle_seed": 3,
                       **overrides})


def batches_of(cfg, tok, state=None, process_index=0, process_count=1, gather=None):
  stream = objective_rows(pipeline.packed_lm_rows, cfg, tok, "train")
  assert isinstance(stream, streaming.StreamRows)
  if gather is None:
    return train_batches(stream, cfg.batch_size, cfg.shuffle_seed, state=state,
                         process_index=process_index, process_count=process_count)
  return streaming.StreamIterator(stream, cfg.batch_size, cfg.shuffle_seed, state=state,
                                  process_index=process_index, process_count=process_count,
                                  gather=gather)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def traced_peak(fn) -> int:
  """Peak bytes allocated by Python and numpy while `fn` runs (tracemalloc)."""
  tracemalloc.start()
  try:
    fn()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_memory_stays_flat_when_the_corpus_grows_tenfold(tmp_path, tok):
  small, large = tmp_path / "x1", tmp_path / "x10"
  write_shards(small, 2, 300)
  write_shards(large, 2, 3000)  # the same files, each 10x longer (about 1.2 MB in all)
  stream = lambda d: lambda: take(batches_of(stream_cfg(d), tok), 40)
  stream(small)()  # first-use allocations (imports, caches) are not the corpus's
  peak_1, peak_10 = traced_peak(stream(small)), traced_peak(stream(large))
  assert peak_10 < 1.3 * peak_1 + 64 * 1024, (peak_1, peak_10)
  # The measure would catch an in-memory reader: reading the split grows tenfold.
  in_memory = lambda d: lambda: sources.load_documents(stream_cfg(d, streaming=False), "train")
  assert traced_peak(in_memory(large)) > 5 * traced_peak(in_memory(small))


def test_rows_are_the_documents_concatenated_and_split(tmp_path, tok):
  """Rows hold the train documents' (input, target) pairs in file order, full rows, one
  segment per piece with positions from 0: a NumPy reference."""
  per_file = write_shards(tmp_path, 3, 40)
  cfg = stream_cfg(tmp_path)
  order = np.random.default_rng([cfg.shuffle_seed, 0]).permutation(3)  # epoch 0's file order
  docs = [d for f in order for d in per_file[f] if corpus.split_of(d, 2) == "train"]
  assert 0 < len(docs) < 120  # some are held out for validation
  ids = [np.array([tok.bos_id, *tok.encode(d), tok.eos_id], np.int32) for d in docs]
  want_inputs = np.concatenate([i[:-1] for i in ids])
  want_targets = np.concatenate([i[1:] for i in ids])
  batches = take(batches_of(cfg, tok), 6)
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  n = rows["inputs"].size
  np.testing.assert_array_equal(rows["inputs"].ravel(), want_inputs[:n])
  np.testing.assert_array_equal(rows["targets"].ravel(), want_targets[:n])
  assert rows["weights"].min() == 1.0 and rows["inputs"].shape == (6 * BATCH, SEQ_LEN)
  starts = rows["positions"] == 0
  np.testing.assert_array_equal(np.cumsum(starts, axis=1), rows["segment_ids"])
  # a piece continued from the previous row starts at position 0 of a new segment
  assert rows["segment_ids"][:, 0].min() == 1


def test_resume_after_an_interruption_yields_the_same_batches(tmp_path, tok):
  write_shards(tmp_path, 3, 8)  # small: the run below crosses epochs
  cfg = stream_cfg(tmp_path)
  uninterrupted = take(batches_of(cfg, tok), 40)
  for stop in (1, 7, 23):
    first = batches_of(cfg, tok)
    take(first, stop)
    state = json.loads(json.dumps(first.state))  # as the checkpoint stores it
    assert_same(take(batches_of(cfg, tok, state=state), 40 - stop), uninterrupted[stop:])
  assert state["streaming"][0]["parent_state"]["epoch"] >= 1  # resumed in a later epoch
  # each epoch reads the same documents, the files in a new order
  paths = sources.resolve_paths(cfg, f"{tmp_path}/*.jsonl")
  read = list(streaming.FileDocuments(streaming.file_spec(cfg, "train", paths, epochs=4)))
  epochs = [read[e * len(read) // 4:(e + 1) * len(read) // 4] for e in range(4)]
  assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
  assert len({tuple(e) for e in epochs}) > 1
  with pytest.raises(ConfigError, match="not of a streaming run"):
    batches_of(cfg, tok, state={"epoch": 0, "index": 3})
  in_memory = objective_rows(pipeline.packed_lm_rows, stream_cfg(tmp_path, streaming=False),
                             tok, "train")
  with pytest.raises(ConfigError, match="of a streaming run; resume with config.data.stream"):
    train_batches(in_memory, BATCH, 0, state=state)


def test_two_processes_read_disjoint_files_that_cover_all(tmp_path, tok):
  per_file = write_shards(tmp_path, 5, 30)
  paths = sources.resolve_paths(stream_cfg(tmp_path), f"{tmp_path}/*.jsonl")
  shards = [streaming.shard_files(paths, p, 2) for p in range(2)]
  assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == paths
  cfg = stream_cfg(tmp_path)
  read = [set(streaming.FileDocuments(streaming.file_spec(cfg, "train", s, epochs=1)))
          for s in shards]
  everything = {d for docs in per_file for d in docs if corpus.split_of(d, 2) == "train"}
  assert not read[0] & read[1] and read[0] | read[1] == everything
  # each process makes its half of every batch; one checkpointed state resumes both
  alone = lambda own: [own]  # a stand-in for the all-gather: each process's own state
  iterators = [batches_of(cfg, tok, process_index=p, process_count=2, gather=alone)
               for p in range(2)]
  halves = [take(it, 5) for it in iterators]
  assert halves[0][0]["inputs"].shape == (BATCH // 2, SEQ_LEN)
  assert not np.array_equal(halves[0][0]["inputs"], halves[1][0]["inputs"])
  state = {"streaming": [it.state["streaming"][0] for it in iterators]}
  gathered = lambda own: state["streaming"]
  nexts = [take(it, 3) for it in iterators]
  for p in range(2):
    assert_same(take(batches_of(cfg, tok, state=state, process_index=p, process_count=2,
                                gather=gathered), 3), nexts[p])
  with pytest.raises(ConfigError, match="of 2 process"):
    batches_of(cfg, tok, state=state)
  with pytest.raises(ConfigError, match="at least 8 shards"):
    streaming.shard_files(paths, 0, 8)


def test_bad_streaming_inputs_are_one_line_errors(tmp_path, tok):
  with pytest.raises(DataError, match="no file matches"):
    objective_rows(pipeline.packed_lm_rows, stream_cfg(tmp_path / "none"), tok, "train")
  (tmp_path / "a.jsonl").write_text('{"text": "alpha beta"}\n\n{"text": "gamma"\n')
  with pytest.raises(DataError, match=r"a\.jsonl:3: not valid JSON"):
    take(batches_of(stream_cfg(tmp_path), tok), 2)
  (tmp_path / "a.jsonl").write_text('{"text": "alpha beta"}\n{"body": "gamma"}\n')
  with pytest.raises(DataError, match=r"a\.jsonl:2: no string under config.data.text_key"):
    take(batches_of(stream_cfg(tmp_path), tok), 2)
  (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": w}) + "\n" for w in WORDS[:20]
                                            if corpus.split_of(w, 2) == "train"))
  with pytest.raises(DataError, match="split 'validation' of .* has no document; add text"):
    objective_rows(pipeline.packed_lm_rows, stream_cfg(tmp_path), tok, "validation")
  (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": w}) + "\n" for w in WORDS
                                            if corpus.split_of(w, 2) == "validation"))
  with pytest.raises(DataError, match=r"a\.jsonl hold no train document; add text"):
    take(batches_of(stream_cfg(tmp_path), tok), 1)  # not an endless search
  with pytest.raises(ConfigError, match="max_documents=5 limits in-memory reading"):
    objective_rows(pipeline.packed_lm_rows, stream_cfg(tmp_path, max_documents=5), tok, "train")
  with pytest.raises(ConfigError, match="not config.data.objective='mlm'"):
    objective_rows(pipeline.mlm_rows, stream_cfg(tmp_path, objective="mlm"), tok, "train")
  with pytest.raises(ConfigError, match="reads text:/jsonl: files"):
    objective_rows(pipeline.packed_lm_rows, stream_cfg(tmp_path, source="embedded"), tok,
                   "train")


def test_a_streamed_run_saves_the_position_of_its_next_batch_in_the_checkpoint(
    tmp_path, tok, monkeypatch):
  """The loop trains on the stream and checkpoints its state; restoring that state yields
  the batches an uninterrupted run trains on next (the loop's restore path is the one
  tests/test_train.py checks for in-memory data)."""
  from llm.train import checkpoint as ckpt
  from llm.train import loop
  from llm.train import metrics as metrics_lib
  write_shards(tmp_path / "data", 2, 150)  # ~2% held out: a few validation documents
  # tests/test_train.py's run on streamed data: the same programs, compiled once per suite
  cfg = test_train.make_config()
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(
      cfg.data, source=f"jsonl:{tmp_path}/data/*.jsonl", streaming=True, max_documents=0,
      tokenizer_path=tok.path))
  monkeypatch.setenv("LLM_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(jax, "devices", lambda *a: jax.local_devices()[:1])  # 1-device mesh
  served, next_batch = [], streaming.StreamIterator.__next__
  monkeypatch.setattr(streaming.StreamIterator, "__next__",
                      lambda self: served.append(next_batch(self)) or served[-1])
  workdir = str(tmp_path / "run")
  last = loop.run(cfg, workdir, progress=False)
  monkeypatch.setattr(streaming.StreamIterator, "__next__", next_batch)
  assert last["step"] == 6 and np.isfinite(last["train_loss"]) and "eval_loss" in last
  reference = batches_of(cfg.data, tok)
  assert_same(served, take(reference, 6))
  following = take(reference, 3)
  mgr = ckpt.manager(workdir, 3, async_save=False, create=False)
  for step in (2, 4, 6):
    saved = mgr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    resumed = take(batches_of(cfg.data, tok, state=saved), 9 - step)
    assert_same(resumed, (served + following)[step:])
  mgr.close()
  assert [r["step"] for r in metrics_lib.read_metrics(workdir) if "train_loss" in r] == \
      [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A TFDS dataset prepared as array_record: 41 train and 3 validation texts."""
  tfds = pytest.importorskip("tensorflow_datasets")
  tfds.disable_progress_bar()
  rng = random.Random(5)
  texts = {"train": [f"{i} " + " ".join(rng.choices(WORDS, k=rng.randint(3, 30)))
                     for i in range(41)], "validation": ["held out", "also held", "out"]}
  directory = tmp_path_factory.mktemp("tfds")
  prepare_text_tfds(tfds, "StreamTextForTest", texts, directory)
  return str(directory), texts


def test_a_tfds_split_streams_by_index_per_process_and_resumes(tfds_dir, tok):
  directory, texts = tfds_dir
  cfg = DataConfig(source="tfds:stream_text_for_test", data_dir=directory, seq_len=SEQ_LEN,
                   batch_size=BATCH, streaming=True, shuffle_seed=3)
  spec = objective_rows(pipeline.packed_lm_rows, cfg, tok, "train").spec
  # each process its own examples, together all; every epoch in a new order
  halves = [list(itertools.islice(streaming.tfds_documents(spec, p, 2), 20 + (p == 0)))
            for p in range(2)]
  assert not set(halves[0]) & set(halves[1])
  assert sorted(halves[0] + halves[1]) == sorted(texts["train"])
  epochs = list(itertools.islice(streaming.tfds_documents(spec), 3 * 41))
  assert sorted(epochs[41:82]) == sorted(texts["train"]) and epochs[:41] != epochs[41:82]
  uninterrupted = take(batches_of(cfg, tok), 30)  # crosses epochs
  for stop in (3, 17):
    first = batches_of(cfg, tok)
    take(first, stop)
    state = json.loads(json.dumps(first.state))
    assert_same(take(batches_of(cfg, tok, state=state), 30 - stop), uninterrupted[stop:])
  evaluation = objective_rows(pipeline.packed_lm_rows, cfg, tok, "validation")
  assert int(evaluation["weights"].sum()) == sum(len(tok.encode(t)) + 1
                                                 for t in texts["validation"])
