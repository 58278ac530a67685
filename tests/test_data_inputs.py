"""Bad data as users have it: files that do not decode or cannot be read, a file named
twice, splits with nothing to evaluate, corrupt cache entries; cache files' permissions.
No model is compiled here."""

import json
import logging
import os
import stat

import numpy as np
import pytest

from llm import config as config_lib, data, objectives
from llm.data import cache, packing, sources, tokenizer as tokenizer_lib
from llm.data.sources import DataError

TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox {i % 7} jumps over {i % 5} dogs."
                   for i in range(300))
VOCAB, SENTINELS = 360, 8


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("LLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "t.model"
  return data.train_tokenizer(TEXT.split("\n\n"), VOCAB, path, SENTINELS)


def _text_config(path, **data_fields):
  return config_lib.DataConfig(source=f"text:{path}", **data_fields)


def test_a_file_that_is_not_utf8_is_refused_by_name_unless_its_encoding_is_given(tmp_path):
  path = tmp_path / "latin.txt"
  path.write_bytes("first line\n\nun caf\u00e9 cr\u00e8me\n\nmore".encode("latin-1"))
  with pytest.raises(DataError) as e:
    data.load_documents(_text_config(path), "train")
  assert str(e.value) == (f"{path}: not valid utf-8 (byte 0xe9 on line 3); convert the "
                          "file, or set config.data.encoding to its encoding (e.g. latin-1)")
  docs = data.load_documents(_text_config(path, encoding="latin-1"), "train") + \
      data.load_documents(_text_config(path, encoding="latin-1"), "validation")
  assert sorted(docs) == ["first line", "more", "un caf\u00e9 cr\u00e8me"]
  jsonl = tmp_path / "d.jsonl"
  jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(DataError, match=rf"^{jsonl}: not valid utf-8 \(byte 0xe9 on line 2\)"):
    data.load_documents(config_lib.DataConfig(source=f"jsonl:{jsonl}"), "train")
  # The encoding is part of the cache keys: the same file decoded otherwise is other text.
  assert sources.source_fingerprint(_text_config(path), "train") != \
      sources.source_fingerprint(_text_config(path, encoding="latin-1"), "train")


def test_an_unreadable_file_is_refused_by_name():
  # /proc/self/mem is a regular file no one (root included) can read from offset 0.
  with pytest.raises(DataError) as e:
    data.load_documents(config_lib.DataConfig(source="text:/proc/self/mem"), "train")
  assert str(e.value) == ("/proc/self/mem: cannot be read (Input/output error); check its "
                          "permissions")


def test_a_file_named_twice_is_refused(tmp_path):
  (tmp_path / "a.txt").write_text(TEXT)
  (tmp_path / "b.txt").write_text(TEXT[:500])
  os.symlink(tmp_path / "a.txt", tmp_path / "link.txt")
  for listed, named, also in [
      (f"{tmp_path}/a.txt,{tmp_path}/a.txt", f"{tmp_path}/a.txt", ""),
      (f"{tmp_path}/a.txt,{tmp_path}/*.txt", f"{tmp_path}/a.txt", ""),
      (f"{tmp_path}/b.txt,{tmp_path}/link.txt,{tmp_path}/a.txt", f"{tmp_path}/a.txt",
       f" (also as '{tmp_path}/link.txt')")]:
    with pytest.raises(DataError) as e:
      data.load_documents(config_lib.DataConfig(source=f"text:{listed}"), "train")
    assert str(e.value) == (f"config.data.source='text:{listed}': {named!r} is named twice"
                            f"{also}; name each file once")
  assert data.load_documents(  # distinct files are fine
      config_lib.DataConfig(source=f"text:{tmp_path}/a.txt,{tmp_path}/b.txt"), "train")


def _objective_config(objective, source, **data_fields):
  family = {"mlm": "encoder", "span": "encoder_decoder"}.get(objective, "decoder")
  model = dict(family=family, vocab_size=VOCAB, d_model=16, num_heads=2, d_ff=32, max_len=64,
               positions="relative" if family == "encoder_decoder" else "learned")
  return config_lib.from_configdict({"model": model, "data": dict(
      objective=objective, source=source, seq_len=32, num_sentinels=SENTINELS, **data_fields)})


# Preference objectives (dpo, reward) read config.align.preferences, and PPO's rows are its
# rollouts: every other objective reads config.data.source or config.data.tasks.
TEXT_OBJECTIVES = [name for name in objectives.OBJECTIVES if name not in ("dpo", "ppo", "reward")]


@pytest.mark.parametrize("objective", TEXT_OBJECTIVES)
def test_an_empty_evaluation_split_is_an_error_for_every_objective(objective, tok, tmp_path):
  # Copies of one paragraph all hash to "train": validation is empty.
  path = tmp_path / "one.txt"
  path.write_text("\n\n".join(["Only this paragraph, again and again."] * 40))
  records = tmp_path / "one.jsonl"
  records.write_text(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\n")
  cfg = _objective_config(objective, f"text:{path}", tasks=f"jsonl:{records}")
  assert data.load_documents(cfg.data, "validation") == []
  obj = objectives.get(objective)
  assert len(next(iter(obj.rows(cfg, tok, "train").values()))) > 0  # train has rows
  with pytest.raises(DataError) as e:
    obj.rows(cfg, tok, "validation")
  message = str(e.value)
  assert "'validation'" in message and "no " in message and "\n" not in message, message
  if objective not in ("clm", "prefix_lm", "distill"):  # those stop earlier, at packing
    source = f"tasks='jsonl:{records}'" if objective == "sft" else f"source='text:{path}'"
    assert message == (f"config.data.eval_split='validation' of config.data.{source} has no "
                       f"{objective} examples (0 rows); add data or choose another split")


def test_rows_without_a_weighted_token_are_empty_too():
  cfg = _objective_config("clm", "embedded")
  rows = {"inputs": np.ones((2, 4), np.int32), "weights": np.zeros((2, 4), np.float32)}
  with pytest.raises(DataError, match=r"config.data.train_split='train' of config.data."
                                      r"source='embedded' has no clm examples \(2 rows, no "
                                      r"weighted token\)"):
    objectives.check_rows(rows, cfg, "train")
  rows["weights"][1, 2] = 1.0
  assert objectives.check_rows(rows, cfg, "train") is rows


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_corrupt_packed_dataset_cache_is_reported_and_rebuilt(tok, tmp_path, caplog):
  (tmp_path / "d.txt").write_text(TEXT)
  cfg = _text_config(tmp_path / "d.txt", seq_len=32)
  first = data.build_dataset(cfg, tok, "train", cache_dir=tmp_path / "c")
  [path] = (tmp_path / "c").glob("*.npz")
  whole = path.read_bytes()
  for corrupt, why in [(whole[:len(whole) // 2], "BadZipFile"), (b"", "EOFError"),
                       (None, "shapes")]:
    if corrupt is None:  # a readable archive of the wrong shapes
      np.savez(path, **{name: first[name][:, :5] for name in packing.FEATURES})
    else:
      path.write_bytes(corrupt)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      again = data.build_dataset(cfg, tok, "train", cache_dir=tmp_path / "c")
    for name in packing.FEATURES:
      np.testing.assert_array_equal(again[name], first[name])
    [said] = _warnings(caplog)
    assert said.startswith(f"cache file {path} is corrupt ({why}") and \
        said.endswith("; rebuilding it"), said
    assert path.read_bytes() == whole  # rewritten whole
  caplog.clear()
  data.build_dataset(cfg, tok, "train", cache_dir=tmp_path / "c")
  assert not _warnings(caplog)  # a whole entry is read without a word


def test_a_corrupt_cached_tokenizer_is_reported_and_retrained(tok, tmp_path, caplog):
  (tmp_path / "d.txt").write_text(TEXT)
  cfg = _text_config(tmp_path / "d.txt", num_sentinels=SENTINELS)
  trained = data.get_tokenizer(cfg, VOCAB, tmp_path / "run1")
  [path] = (tmp_path / "cache" / "tokenizers").glob("*.model")
  other = data.train_tokenizer(TEXT.split("\n\n"), VOCAB + 20, tmp_path / "o.model", SENTINELS)
  for corrupt, why in [(b"\x00garbage", "not a readable SentencePiece model"),
                       (other.model_proto, f"{VOCAB + 20} pieces, not {VOCAB}")]:
    path.write_bytes(corrupt)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      again = data.get_tokenizer(cfg, VOCAB, tmp_path / f"run-{len(corrupt)}")
    assert again.model_proto == trained.model_proto == path.read_bytes()
    [said] = _warnings(caplog)
    assert said.startswith(f"cache file {path} is corrupt ({why}") and \
        said.endswith("; rebuilding it"), said


def test_an_unreadable_json_cache_entry_is_reported_not_fatal(tmp_path, caplog):
  path = tmp_path / "entry.json"
  assert cache.read_json(path) is None and not _warnings(caplog)  # absent: quietly None
  path.write_bytes(b'{"train": ["cut off')
  with caplog.at_level(logging.WARNING):
    assert cache.read_json(path) is None
  [said] = _warnings(caplog)
  assert said.startswith(f"cache file {path} is corrupt (JSONDecodeError: ")
  cache.write_json(path, {"a": [1]})
  assert cache.read_json(path) == {"a": [1]}


@pytest.mark.parametrize("umask, mode", [(0o077, 0o600), (0o022, 0o644), (0o002, 0o664)])
def test_cache_files_get_the_permissions_of_the_users_umask(umask, mode, tmp_path, tok):
  previous = os.umask(umask)
  try:
    cache.write_json(tmp_path / "c" / "x.json", [1])
    tokenizer_lib.install_tokenizer(tok.path, tmp_path / "w")
  finally:
    os.umask(previous)
  for path in (tmp_path / "c" / "x.json", tmp_path / "w" / "tokenizer.model"):
    assert stat.S_IMODE(path.stat().st_mode) == mode, oct(path.stat().st_mode)
  assert not [p for p in (tmp_path / "c").iterdir() if p.name != "x.json"]  # no temp left
