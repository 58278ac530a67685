"""Mixtures of pretraining sources (config.data.sources): weights, tokens seen, resuming,
process slices, config errors, and the embedded corpus's two domains. No model is built."""

import json

import numpy as np
import pytest

from llm import config as config_lib
from llm import objectives
from llm.data import corpus, sources, source_mixture, train_tokenizer
from llm.data.source_mixture import MixedRows, MixtureIterator


def _mixed(rates=(0.2, 0.5, 0.3), sizes=(7, 50, 13), seq_len=6):
  """Rows whose inputs name their source (s + 1) and row; row r of source s has r % seq_len
  + 1 real tokens, so tokens seen can be counted from the batches themselves."""
  rows = []
  for s, n in enumerate(sizes):
    real = (np.arange(n) % seq_len + 1)[:, None] > np.arange(seq_len)[None, :]
    rows.append({"inputs": np.full((n, seq_len), s + 1, np.int32) * 1000
                 + np.arange(n, dtype=np.int32)[:, None],
                 "segment_ids": real.astype(np.int32)})
  return MixedRows(("a", "b", "c"), tuple(rows), rates)


def test_weights_are_respected_and_tokens_counted():
  mixed = _mixed()
  it = MixtureIterator(mixed, batch_size=32, seed=3)
  counts, tokens = np.zeros(3), np.zeros(3)
  for _ in range(300):
    batch = next(it)
    source_B = batch["inputs"][:, 0] // 1000 - 1
    counts += np.bincount(source_B, minlength=3)
    for s in range(3):
      tokens[s] += batch["segment_ids"][source_B == s].sum()
  share = counts / counts.sum()
  # 9600 draws: a binomial share's standard deviation is <= 0.005.
  np.testing.assert_allclose(share, mixed.rates, atol=0.02)
  assert it.metrics == {f"tokens_seen/{n}": int(t) for n, t in zip(mixed.names, tokens)}
  # Each source cycles through all of its rows (fresh permutations per epoch).
  seen = set()
  for batch in (next(it) for _ in range(50)):
    seen.update(batch["inputs"][:, 0].tolist())
  assert {v for v in seen if v // 1000 == 1} == {1000 + r for r in range(7)}


def test_resumes_exactly_and_slices_processes():
  mixed = _mixed()
  straight = MixtureIterator(mixed, batch_size=8, seed=1)
  first = [next(straight) for _ in range(5)]
  state = json.loads(json.dumps(straight.state))  # as the checkpoint stores it
  later = [next(straight) for _ in range(4)]
  resumed = MixtureIterator(mixed, batch_size=8, seed=1, state=state)
  for a, b in zip(later, (next(resumed) for _ in range(4))):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert resumed.state == straight.state
  halves = [MixtureIterator(mixed, 8, seed=1, process_index=p, process_count=2) for p in (0, 1)]
  for whole in first:
    parts = [next(h)["inputs"] for h in halves]
    np.testing.assert_array_equal(np.concatenate(parts), whole["inputs"])
  other_seed = MixtureIterator(mixed, batch_size=8, seed=2)
  assert not np.array_equal(next(other_seed)["inputs"], first[0]["inputs"])
  with pytest.raises(ValueError, match="same config.data.sources"):
    MixtureIterator(mixed, 8, seed=1, state={"epoch": 0, "index": 3})


def _config(**data):
  cd = config_lib.default_configdict()
  cd.model.update(vocab_size=400, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=32)
  cd.data.update(seq_len=32, batch_size=4, num_sentinels=4, **data)
  return config_lib.from_configdict(cd)


@pytest.mark.parametrize("sources_value, message", [
    ((("embedded:topics", -1.0), ("embedded:docstrings", 2.0)), "must be >= 0"),
    ((("embedded:topics", 0), ("embedded:docstrings", 0.0)), "positive sum"),
    (("embedded:topics",), "not a \\(source, weight\\) pair"),
    ((("embedded:topics", "1"),), "not a \\(source, weight\\) pair"),
    ((("nosuch:x", 1.0),), "expected one of"),
    ((("embedded", 1.0), ("embedded", 2.0)), "named twice"),
])
def test_bad_sources_fail_in_one_line(sources_value, message):
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    _config(sources=sources_value)
  assert "\n" not in str(e.value)


def test_sources_survive_the_saved_config():
  cfg = _config(sources=(("embedded:topics", 1), ("embedded:docstrings", 3.0)))
  assert config_lib.from_json(config_lib.to_json(cfg)).data.sources == cfg.data.sources
  assert source_mixture.check_sources(cfg.data) == (0.25, 0.75)


def test_domains_split_the_embedded_corpus_and_mix(tmp_path, tmp_path_factory, monkeypatch):
  # The cache test_train.py uses: the embedded corpus is built once per session.
  monkeypatch.setenv("LLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
  for split in corpus.SPLITS:
    topics = corpus.embedded_documents(split, "topics")
    docstrings = corpus.embedded_documents(split, "docstrings")
    assert sorted(topics + docstrings) == sorted(corpus.embedded_documents(split))
    assert topics and docstrings and not set(topics) & set(docstrings)
  cfg = _config(sources=(("embedded:topics", 1), ("embedded:docstrings", 1)), max_documents=12)
  docs = sources.load_documents(cfg.data, "train")  # the tokenizer's text: both, in turn
  assert docs[0::2] == corpus.embedded_documents("train", "topics")[:12]
  assert docs[1::2] == corpus.embedded_documents("train", "docstrings")[:12]
  tokenizer = train_tokenizer(docs, 400, tmp_path / "tok.model", cfg.data.num_sentinels)
  clm = objectives.get("clm")
  train = clm.rows(cfg, tokenizer, "train")
  assert isinstance(train, MixedRows) and train.names == ("embedded:topics", "embedded:docstrings")
  single = clm.rows(_config(source="embedded:topics", max_documents=12), tokenizer, "train")
  for key in single:
    np.testing.assert_array_equal(train.rows[0][key], single[key])
  evaluation = clm.rows(cfg, tokenizer, "validation")
  assert set(evaluation) == set(single) and len(evaluation["inputs"]) == sum(
      len(clm.rows(_config(source=s, max_documents=12), tokenizer, "validation")["inputs"])
      for s, _ in cfg.data.sources)


def test_sources_from_the_command_line():
  from experiments import cli
  cd = config_lib.default_configdict()
  cli.apply_override(cd, "data.sources", "(('embedded:topics', 1), ('embedded:docstrings', 3))")
  assert cd.data.sources == (("embedded:topics", 1), ("embedded:docstrings", 3))
  with pytest.raises(config_lib.ConfigError, match="expected a tuple"):
    cli.apply_override(cd, "data.sources", "embedded:topics")
