"""Tests of llm.data: tokenizer, embedded corpus, sources, packing, batching."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from llm.config import DataConfig
from llm import data
from llm.data import corpus, packing, sources, tokenizer as tokenizer_lib
from tests.helpers import prepare_text_tfds

SMALL_VOCAB = 600
SENTINELS = 10


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
  """One cache for the session: the embedded corpus is built once, not per test."""
  return tmp_path_factory.mktemp("llm_cache")


@pytest.fixture(autouse=True)
def _isolated_cache(session_cache, monkeypatch):
  monkeypatch.setenv("LLM_CACHE", str(session_cache))


@pytest.fixture(scope="session")
def train_docs(session_cache):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("LLM_CACHE", str(session_cache))
    return data.embedded_documents("train")


@pytest.fixture(scope="session")
def tok(train_docs, tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return data.train_tokenizer(train_docs[:400], SMALL_VOCAB, path, SENTINELS)


# --- tokenizer ---------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return  x\t+ 1  \n\n  trailing   ",
    "naïve café — 日本語 🙂 ﬁ Ωmega",
    "",
])
def test_tokenizer_round_trip(tok, text):
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_tokenizer_round_trips_held_out_documents(tok):
  docs = data.embedded_documents("validation")[:50]
  assert [tok.decode(ids) for ids in tok.encode_batch(docs)] == docs


def test_tokenizer_special_ids(tok):
  assert tok.vocab_size == SMALL_VOCAB
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.id_to_piece(tok.mask_id) == "<mask>"
  assert len(tok.sentinel_ids) == SENTINELS
  special = [tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id, tok.mask_id] + tok.sentinel_ids
  assert len(set(special)) == len(special)
  assert all(0 <= i < tok.vocab_size for i in special)
  ids = tok.encode("hello world", add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.decode([tok.pad_id, tok.bos_id, tok.eos_id, tok.pad_id]) == ""
  assert tok.decode([tok.sentinel_ids[0]]) == "<extra_id_0>"
  assert tok.sentinel_ids[3] in tok.encode("a <extra_id_3> b")  # one piece, never split
  assert tok.decode(np.array(tok.encode("numpy ids"), np.int32)) == "numpy ids"


def test_tokenizer_pickles(tok):
  import pickle  # pylint: disable=import-outside-toplevel
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode("some text") == tok.encode("some text")


@pytest.mark.parametrize("vocab_size,num_sentinels", [(360, 4), (1000, 100)])
def test_train_tokenizer_exact_vocab_size(train_docs, tmp_path, vocab_size, num_sentinels):
  path = tmp_path / "t.model"
  tok = data.train_tokenizer(train_docs[:300], vocab_size, path, num_sentinels)
  assert tok.vocab_size == vocab_size
  assert data.Tokenizer.load(path).vocab_size == vocab_size
  assert len(tok.sentinel_ids) == num_sentinels


def test_train_tokenizer_is_deterministic(train_docs, tmp_path):
  a = data.train_tokenizer(train_docs[:200], 500, tmp_path / "a.model", 5)
  b = data.train_tokenizer(train_docs[:200], 500, tmp_path / "b.model", 5)
  assert a.model_proto == b.model_proto


@pytest.mark.parametrize("vocab_size,num_sentinels,num_docs", [
    (300, 100, 10),  # the reserved ids alone do not fit
    (300, 4, 300),  # nor do the corpus's common characters
    (8192, 4, 3),  # too little text to learn that many pieces
])
def test_train_tokenizer_bad_vocab_size(train_docs, tmp_path, vocab_size, num_sentinels,
                                        num_docs):
  with pytest.raises(ValueError, match=rf"config\.model\.vocab_size={vocab_size}") as e:
    data.train_tokenizer(train_docs[:num_docs], vocab_size, tmp_path / "t.model", num_sentinels)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "t.model").exists()


def test_get_tokenizer_trains_caches_and_copies(session_cache, train_docs, tmp_path,
                                                monkeypatch):
  # A fresh tokenizer cache, but the session's corpus (building it again is slow; the
  # train_docs fixture builds it, so this test passes alone as in any order).
  shutil.copytree(session_cache / "corpus", tmp_path / "cache" / "corpus")
  monkeypatch.setenv("LLM_CACHE", str(tmp_path / "cache"))
  cfg = DataConfig(max_documents=150, num_sentinels=5)
  tok = data.get_tokenizer(cfg, 500, tmp_path / "run1")
  assert tok.vocab_size == 500
  assert (tmp_path / "run1" / "tokenizer.model").exists()
  assert list((tmp_path / "cache" / "tokenizers").glob("*.model"))

  def no_training(*args, **kwargs):
    raise AssertionError("retrained although a cached tokenizer exists")
  monkeypatch.setattr(tokenizer_lib, "train_tokenizer", no_training)
  again = data.get_tokenizer(cfg, 500, tmp_path / "run2")
  assert again.model_proto == tok.model_proto


def test_get_tokenizer_wrong_vocab_size(tok, tmp_path):
  cfg = DataConfig(tokenizer_path=tok.path)
  with pytest.raises(ValueError, match=r"config\.model\.vocab_size=1024.*set config\.model"
                                       rf"\.vocab_size={SMALL_VOCAB}") as e:
    data.get_tokenizer(cfg, 1024, tmp_path / "run")
  assert "\n" not in str(e.value)
  loaded = data.get_tokenizer(cfg, SMALL_VOCAB, tmp_path / "run")  # copied into the workdir
  assert loaded.path == str(tmp_path / "run" / "tokenizer.model")
  with pytest.raises(ValueError, match="workdir"):
    data.get_tokenizer(DataConfig(), 1024, tmp_path / "run")


# --- embedded corpus ---------------------------------------------------------

def test_embedded_corpus(train_docs):
  validation = data.embedded_documents("validation")
  fresh = corpus.split_documents(corpus.build_documents())  # a second, uncached build
  assert fresh == {"train": train_docs, "validation": validation}
  size = sum(len(d.encode("utf-8")) for d in train_docs + validation)
  assert size >= 1_500_000
  assert sum(len(d.encode("utf-8")) for d in validation) >= 30_000
  assert not set(train_docs) & set(validation)
  assert min(len(d) for d in train_docs + validation) >= 200
  with pytest.raises(ValueError):
    data.embedded_documents("test")


# --- sources -----------------------------------------------------------------

def _paragraphs(n):
  return [f"Document {i}: " + " ".join(f"word{j}" for j in range(i % 7 + 3)) for i in range(n)]


def test_text_source(tmp_path):
  docs = _paragraphs(300)
  (tmp_path / "a.txt").write_text("\n\n".join(docs[:200]) + "\n")
  (tmp_path / "b.txt").write_text("\n \n".join(docs[200:]))
  cfg = DataConfig(source=f"text:{tmp_path}/*.txt")
  train = data.load_documents(cfg, "train")
  validation = data.load_documents(cfg, "validation")
  assert sorted(train + validation) == sorted(docs)
  assert validation and not set(train) & set(validation)
  assert data.load_documents(cfg, "train") == train  # deterministic
  single = DataConfig(source=f"text:{tmp_path}/a.txt,{tmp_path}/b.txt", max_documents=5)
  assert data.load_documents(single, "train") == train[:5]


def test_jsonl_source(tmp_path):
  docs = _paragraphs(120)
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)))
  cfg = DataConfig(source=f"jsonl:{path}", text_key="body")
  train, validation = data.load_documents(cfg, "train"), data.load_documents(cfg, "validation")
  assert sorted(train + validation) == sorted(docs) and validation
  with pytest.raises(data.DataError, match=r"config\.data\.text_key='text'"):
    data.load_documents(DataConfig(source=f"jsonl:{path}"), "train")


def test_tiny_local_source_still_has_validation(tmp_path):
  (tmp_path / "t.txt").write_text("one\n\ntwo\n\nthree\n\ntwo")
  cfg = DataConfig(source=f"text:{tmp_path}/t.txt")
  train, validation = data.load_documents(cfg, "train"), data.load_documents(cfg, "validation")
  assert len(validation) >= 1 and not set(train) & set(validation)
  assert sorted(train + validation) == ["one", "three", "two", "two"]


def test_missing_file_and_unknown_prefix(tmp_path):
  for source in (f"text:{tmp_path}/missing.txt", f"jsonl:{tmp_path}/nothing*.jsonl"):
    with pytest.raises(data.DataError, match=r"config\.data\.source=") as e:
      data.load_documents(DataConfig(source=source), "train")
    assert "\n" not in str(e.value)
  with pytest.raises(data.DataError, match=r"embedded \| text:PATH.*jsonl:.*tfds:") as e:
    data.load_documents(DataConfig(source="hf:wikitext"), "train")
  assert "\n" not in str(e.value)


# --- TFDS --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tfds():
  return pytest.importorskip("tensorflow_datasets")


def test_tfds_mock_data(tfds):
  cfg = DataConfig(source="tfds:lm1b", max_documents=4)
  with tfds.testing.mock_data(num_examples=7):
    docs = data.load_documents(cfg, "train")
    everything = data.load_documents(dataclasses.replace(cfg, max_documents=0), "train")
  assert len(docs) == 4 and len(everything) == 7
  assert all(isinstance(d, str) for d in everything)


def test_tfds_prepared_dataset_without_builder_code(tfds, tmp_path):
  """A dataset prepared as array_record reads back, with no TensorFlow, by name."""
  tfds.disable_progress_bar()
  texts = {"train": [f"train text {i} ünï" for i in range(12)], "validation": ["held out"]}
  prepare_text_tfds(tfds, "TinyTextForTest", texts, tmp_path)
  cfg = DataConfig(source="tfds:tiny_text_for_test", data_dir=str(tmp_path))
  assert sorted(data.load_documents(cfg, "train")) == sorted(texts["train"])
  assert data.load_documents(cfg, "validation") == texts["validation"]
  assert len(data.load_documents(cfg, "train[:25%]")) == 3
  with pytest.raises(data.DataError, match="eval_split"):
    data.load_documents(cfg, "test")


@pytest.mark.parametrize("name", [
    "lm1b", "wikipedia/20230601.en", "huggingface:wikitext/wikitext-2-raw-v1"])
def test_tfds_not_prepared_fails_fast(tfds, tmp_path, name, monkeypatch):
  import socket
  cfg = DataConfig(source=f"tfds:{name}", data_dir=str(tmp_path / "tfds"))
  # Fast means without trying the network (GCS, a registry, a download) or preparing
  # anything: record every attempt (raising could be swallowed on the way).
  attempts = []
  monkeypatch.setattr(socket.socket, "connect", lambda self, *a: attempts.append(a))
  monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: attempts.append(a) or [])
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda self, *a, **k: attempts.append("download_and_prepare"))
  with pytest.raises(data.DataError) as e:
    data.load_documents(cfg, "train")
  assert attempts == []
  message = str(e.value)
  assert "config.data.data_dir" in message and "config.data.tfds_download=True" in message
  assert "\n" not in message
  assert not (tmp_path / "tfds").exists()  # nothing written, nothing downloaded


# --- packing -----------------------------------------------------------------

def _expected_pieces(token_lists, seq_len, bos=2, eos=1):
  pieces = []
  for tokens in token_lists:
    doc = [bos] + list(tokens) + [eos]
    pieces += [doc[i:i + seq_len + 1] for i in range(0, len(doc), seq_len + 1)]
  return sorted(tuple(p) for p in pieces if len(p) >= 2)


def _segments(arrays):
  """Each segment of each row as its token sequence: inputs + the last target."""
  found = []
  for row in range(len(arrays["inputs"])):
    seg = arrays["segment_ids"][row]
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      found.append(tuple(arrays["inputs"][row, idx]) + (arrays["targets"][row, idx[-1]],))
  return sorted(found)


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_pack_documents_invariants(seq_len):
  rng = np.random.default_rng(seq_len)
  lengths = list(rng.integers(0, 90, size=60)) + [0, seq_len - 1, seq_len, seq_len + 1, 3 * seq_len]
  token_lists = [list(rng.integers(4, 500, size=n)) for n in lengths]
  out = data.pack_documents(token_lists, seq_len)
  n = len(out["inputs"])
  for name, dtype in [("inputs", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                      ("positions", np.int32), ("weights", np.float32)]:
    assert out[name].shape == (n, seq_len) and out[name].dtype == dtype
  seg, pos, w = out["segment_ids"], out["positions"], out["weights"]
  real = seg > 0
  np.testing.assert_array_equal(w, real.astype(np.float32))  # zero exactly on padding
  for name in ("inputs", "targets", "positions"):
    assert not out[name][~real].any()
  # Targets are the next inputs inside a segment.
  same = (seg[:, 1:] == seg[:, :-1]) & real[:, 1:]
  np.testing.assert_array_equal(out["targets"][:, :-1][same], out["inputs"][:, 1:][same])
  for row in range(n):
    s = seg[row][real[row]]
    assert real[row][:len(s)].all()  # padding only at the end of a row
    assert s[0] == 1 and np.all(np.diff(s) >= 0) and np.all(np.diff(s) <= 1)  # 1, 2, ...
    for k in np.unique(s):
      np.testing.assert_array_equal(pos[row][seg[row] == k], np.arange((seg[row] == k).sum()))
  pieces_per_doc = [-(-(len(t) + 2) // (seq_len + 1)) for t in token_lists]
  assert w.sum() == sum(len(t) + 2 - p for t, p in zip(token_lists, pieces_per_doc))
  assert _segments(out) == _expected_pieces(token_lists, seq_len)


def test_pack_documents_is_dense_and_deterministic(monkeypatch):
  rng = np.random.default_rng(0)
  token_lists = [list(rng.integers(4, 500, size=n)) for n in rng.integers(1, 200, size=300)]
  a = data.pack_documents(token_lists, 128)
  monkeypatch.setattr(packing, "_SCATTER_TOKENS", 100)  # many small scatter chunks
  b = data.pack_documents(token_lists, 128)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name])
  assert a["weights"].mean() > 0.9
  assert data.pack_documents([], 8)["inputs"].shape == (0, 8)


def test_build_dataset_caches(tok, tmp_path, monkeypatch):
  cfg = DataConfig(seq_len=32, max_documents=40)
  arrays = data.build_dataset(cfg, tok, "train", cache_dir=tmp_path)
  assert arrays["inputs"].shape[1] == 32 and arrays["weights"].sum() > 0
  assert len(list(tmp_path.glob("*.npz"))) == 1
  monkeypatch.setattr(sources, "load_documents", lambda *a: pytest.fail("cache not used"))
  again = data.build_dataset(cfg, tok, "train", cache_dir=tmp_path)
  for name in packing.FEATURES:
    np.testing.assert_array_equal(arrays[name], again[name])
  docs = data.embedded_documents("train")[:40]
  text = tok.decode(arrays["inputs"][0][arrays["segment_ids"][0] == 1])
  assert any(text in d for d in docs)


# --- iterator ----------------------------------------------------------------

def _arrays(rows=37, seq_len=4):
  ids = np.arange(rows * seq_len, dtype=np.int32).reshape(rows, seq_len)
  return {"inputs": ids, "targets": ids + 1, "segment_ids": np.ones_like(ids),
          "positions": np.zeros_like(ids), "weights": np.ones(ids.shape, np.float32)}


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _equal(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_batch_iterator_deterministic_and_resumable():
  arrays = _arrays()
  run = _take(data.BatchIterator(arrays, 8, seed=3), 13)  # 4 batches/epoch: crosses epochs
  assert _equal(run, _take(data.BatchIterator(arrays, 8, seed=3), 13))
  assert not _equal(run, _take(data.BatchIterator(arrays, 8, seed=4), 13))
  assert all(b["inputs"].shape == (8, 4) for b in run)
  epoch = np.concatenate([b["inputs"][:, 0] for b in run[:4]])
  assert len(set(epoch.tolist())) == 32  # no row twice within an epoch
  for split in (1, 4, 5, 9):
    first = data.BatchIterator(arrays, 8, seed=3)
    _take(first, split)
    state = json.loads(json.dumps(first.state))
    resumed = data.BatchIterator(arrays, 8, seed=3, state=state)
    assert _equal(_take(resumed, 13 - split), run[split:])


def test_batch_iterator_process_slices():
  arrays = _arrays()
  whole = _take(data.BatchIterator(arrays, 8, seed=1), 6)
  parts = [_take(data.BatchIterator(arrays, 8, seed=1, process_index=i, process_count=4), 6)
           for i in range(4)]
  for step in range(6):
    slices = [p[step]["inputs"] for p in parts]
    assert all(s.shape == (2, 4) for s in slices)
    np.testing.assert_array_equal(np.concatenate(slices), whole[step]["inputs"])


def test_batch_iterator_errors():
  with pytest.raises(ValueError, match=r"config\.data\.batch_size=64.*seq_len"):
    data.BatchIterator(_arrays(rows=10), 64, seed=0)
  with pytest.raises(ValueError, match="batch_size"):
    data.BatchIterator(_arrays(), 8, seed=0, process_index=0, process_count=3)


def test_eval_batches():
  arrays = _arrays(rows=19)
  batches = data.eval_batches(arrays, 8, num_batches=0)
  assert len(batches) == 3 and all(b["inputs"].shape == (8, 4) for b in batches)
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in batches])[:19],
                                arrays["inputs"])
  assert batches[-1]["weights"][3:].sum() == 0 and batches[-1]["weights"][:3].all()
  assert sum(b["weights"].sum() for b in batches) == arrays["weights"].sum()
  assert len(data.eval_batches(arrays, 8, num_batches=2)) == 2
  assert _equal(data.eval_batches(arrays, 8, 1), batches[:1])
  halves = [data.eval_batches(arrays, 8, 0, process_index=i, process_count=2) for i in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([halves[0][2]["inputs"], halves[1][2]["inputs"]]), batches[2]["inputs"])
