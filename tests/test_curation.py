"""Curation: each filter on hand-made documents, MinHash near duplicates, scrubbing, the
raw-corpus generator's labels, and the sharded run (deterministic, parallel, resumable,
bad input). Pure Python / numpy: no model is built."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import curate as curate_config
from llm.config import ConfigError
from llm.data import raw_corpus
from llm.data.curation import FILTERS, curate, dedup, filters, from_configdict, report

CFG = from_configdict(curate_config.get_config())
PROSE = ("The function returns a new list containing the items of the sequence in sorted "
         "order.\nIf the key argument is given, it is called on each item before the items "
         "are compared.\nThe sort is stable, so items that compare equal keep their order.")
MENU = "Home | About | Blog | Contact\nSkip to main content"
FOOTER = "We use cookies to improve your experience. Accept all cookies.\nPrivacy Policy | Terms of Use"


def apply(name, text):
  return FILTERS[name].apply(text, CFG.params_of(name))


@pytest.mark.parametrize("name, dropped", [
    ("word_count", "Too short to be a page."),
    ("mean_word_length", "data:image/png;base64,\n" + "QUJD" * 40 + "\n" + "RUZH" * 40),
    ("symbol_ratio", '<div class="nav">## {{ menu }} ...</div>\n<a href="/x">#</a> &amp; &nbsp;'
                     " || x || y ||\n" * 3),
    ("alpha_ratio", "12.5 13.0 14.75 | 99 | 100 = 3 * 4 + 7; 1, 2, 3, 4 ... 2001-10-23 5678 "
                    "0x1F 42 % 7 == 0 >= 9 <= 8 != 6 (1) [2] {3} 44 55 66 77 88 99 11 22 33"),
    ("line_punctuation", "\n".join(f"Item {i} of the menu bar" for i in range(20))),
    ("duplicate_lines", "Buy the best cheap watches online today.\n" * 10 + PROSE),
    ("duplicate_ngrams", "cheap watches for sale buy now " * 20 + PROSE),
    ("language", "Der schnelle braune Fuchs springt über den faulen Hund. Diese Funktion gibt "
                 "eine neue Liste zurück, deren Elemente sortiert sind, und sie ändert nichts."),
])
def test_each_filter_keeps_prose_and_drops_its_defect(name, dropped):
  assert apply(name, PROSE) == PROSE
  assert apply(name, dropped) is None


def test_boilerplate_lines_are_removed_and_pages_of_them_dropped():
  assert apply("boilerplate", f"{MENU}\n{PROSE}\n{FOOTER}") == PROSE
  cookies = "The http.cookies module defines classes for handling HTTP cookie state.\n" + PROSE
  assert apply("boilerplate", cookies) == cookies  # about cookies is content
  assert apply("boilerplate", f"{MENU}\n{FOOTER}\nFollow us on Mastodon\nOnly this.") is None


def test_scrub_replaces_planted_personal_data_and_nothing_else():
  text = ("Mail jane.doe@example.org or j_smith+lists@mail.example.co.uk, call +1 (555) 123-4567, "
          "555-987-6543, (555) 222 3333 or +44 20 7946 0958; the host is 192.168.10.24.\n"
          "Not personal: version 3.12.1, 1.2.3.4.5, the date 2024-01-31, pi 3.14159, "
          "@property, user@localhost, 12345678, 999.1.1.1, ISBN 978-0-13-110362-7, x = 255.255.")
  expected = ("Mail <EMAIL> or <EMAIL>, call <PHONE>, <PHONE>, <PHONE> or <PHONE>; the host is "
              "<IP_ADDRESS>.\n" + text.split("\n")[1])
  assert filters.scrub(text) == expected
  records = raw_corpus.generate([PROSE + f" Number {i}." for i in range(60)], seed=5,
                                rates=raw_corpus.Rates(pii=1.0, exact_duplicate=0, near_duplicate=0))
  planted = [(r["text"], r["pii"]) for r in records if r["pii"]]
  assert len(planted) >= 60
  for text, values in planted:
    scrubbed = filters.scrub(text)
    assert not any(v in scrubbed for v in values)
    pattern = re.escape(text)
    for v in values:  # nothing but the planted values changed
      pattern = pattern.replace(re.escape(v), "<(EMAIL|PHONE|IP_ADDRESS)>")
    assert re.fullmatch(pattern, scrubbed)


def _random_docs(n, words=120, seed=0):
  rng = np.random.default_rng(seed)
  vocabulary = [f"w{i}" for i in range(3000)]
  return [" ".join(rng.choice(vocabulary, words)) for _ in range(n)]


def test_minhash_finds_planted_near_duplicates_and_keeps_distinct_documents():
  params = CFG.params_of("near_dedup")
  originals = _random_docs(40)
  rng = np.random.default_rng(1)
  def substitute(doc, at):  # two words replaced: 10 of ~116 shingles change
    ws = doc.split()
    for i in at:
      ws[i] = "edited"
    return " ".join(ws)
  near = [substitute(d, (20 + i, 90 - i)) for i, d in enumerate(originals[:20])]
  far = [raw_corpus.edit_words(d, rng, 0.25) for d in originals[20:30]]
  docs = originals + near + far
  exact = [dedup.jaccard(dedup.shingles(a, params["ngram"]), dedup.shingles(b, params["ngram"]))
           for a, b in zip(originals, near + far)]
  assert min(exact[:20]) > params["threshold"] + 0.05 and max(exact[20:]) < params["threshold"] - 0.2
  signatures = np.stack([dedup.minhash_signature(d, params) for d in docs])
  keep = dedup.select_near(signatures, params)
  assert keep == [True] * 40 + [False] * 20 + [True] * 10
  # The estimate behind it is close to the exact similarity: the share of equal minima.
  # Pair k is documents k and 40 + k (near copies, then far ones).
  estimates = [np.mean(signatures[k] == signatures[40 + k]) for k in range(30)]
  np.testing.assert_allclose(estimates, exact, atol=0.15)


def test_exact_dedup_folds_case_space_and_punctuation():
  docs = [PROSE, PROSE.upper(), "  " + PROSE.replace(" ", "  ") + "\n", PROSE.replace(".", "!"),
          PROSE + " More."]
  assert dedup.select_first(dedup.exact_key(d) for d in docs) == [True, False, False, False, True]


def test_generator_is_seeded_and_its_labels_are_true():
  docs = [PROSE.replace("list", f"list {i}") * 3 for i in range(150)]
  records = raw_corpus.generate(docs, seed=0)
  assert records == raw_corpus.generate(docs, seed=0) != raw_corpus.generate(docs, seed=1)
  counts = raw_corpus.label_counts(records)
  assert all(counts[d] > 0 for d in raw_corpus.DEFECTS)
  seen = set()
  for r in records:
    key, labels = dedup.exact_key(r["text"]), set(r["labels"])
    assert ("exact_duplicate" in labels) == (key in seen and not labels & {"near_duplicate"})
    seen.add(key)
    if "fragment" in labels:
      assert len(r["text"].split()) < 16
    if "other_script" in labels:
      assert not re.search("[A-Za-z]{3}", r["text"])
    if "base64" in labels:
      assert apply("mean_word_length", r["text"]) is None


def test_config_errors_name_the_field():
  cases = [({"filters": "word_count,nosuch"}, "config.filters: unknown filter nosuch"),
           ({"near_dedup": {"threshold": 1.5}}, r"config.near_dedup.threshold=1.5: must be"),
           ({"near_dedup": {"threshold": 0.0}}, r"config.near_dedup.threshold=0.0: must be >"),
           ({"language": {"min_score": -0.1}}, r"config.language.min_score=-0.1: must be >="),
           ({"language": {"language": "xx"}}, "config.language.language='xx'"),
           ({"word_count": {"min_word": 3}}, "config.word_count.min_word: unknown parameter"),
           ({"shard_docs": 0}, "config.shard_docs=0"), ({"colour": 1}, "config.colour: unknown")]
  for override, message in cases:
    cd = curate_config.get_config()
    for key, value in override.items():
      if isinstance(value, dict):
        cd[key].update(value)
      else:
        cd[key] = value
    with pytest.raises(ConfigError, match=message) as e:
      from_configdict(cd)
    assert "\n" not in str(e.value)


def test_scores_by_hand():
  stats = {"labels_in": {"clean": 10, "pii": 5, "boilerplate+pii": 2, "markup": 3},
           "labels_removed": {"markup": 1}, "labels_changed": {"pii": 4, "boilerplate+pii": 2,
                                                              "clean": 1}}
  assert report.scores(stats, ("pii",)) == {"precision": 6 / 8, "recall": 6 / 7,
                                            "clean_flagged": 1, "targets_seen": 7}


def _digest(paths):
  return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


_NOUNS = ("function", "list", "module", "value", "argument", "file", "object", "string",
          "method", "class", "error", "result", "buffer", "socket", "thread", "number")
_VERBS = ("returns", "reads", "writes", "checks", "creates", "closes", "raises", "copies")
_ADJECTIVES = ("new", "empty", "given", "current", "default", "optional", "first", "last")


def english_documents(n, seed=0):
  """Distinct made-up English paragraphs (no third-party text, no corpus build)."""
  rng = np.random.default_rng(seed)
  pick = lambda words: str(rng.choice(words))
  docs = []
  for _ in range(n):
    sentences = [f"The {pick(_ADJECTIVES)} {pick(_NOUNS)} {pick(_VERBS)} the {pick(_NOUNS)} "
                 f"of the {pick(_ADJECTIVES)} {pick(_NOUNS)} when it is {pick(_ADJECTIVES)}."
                 for _ in range(int(rng.integers(4, 9)))]
    docs.append("\n".join(sentences))
  return docs


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("raw") / "raw.jsonl"
  raw_corpus.write_jsonl(raw_corpus.generate(english_documents(40), seed=0), str(path))
  return path


def test_run_is_deterministic_parallel_and_resumes(raw_file, tmp_path):
  cd = curate_config.get_config()
  cd.shard_docs, cd.processes = 16, 1
  serial = from_configdict(cd)
  before = _digest([raw_file])
  result = curate(serial, f"jsonl:{raw_file}", tmp_path / "a", targets=raw_corpus.TARGETS)
  outputs = lambda d: sorted(str(p) for p in (tmp_path / d).glob("shard-*.jsonl"))
  kept = [json.loads(line) for p in outputs("a") for line in open(p)]
  assert len(outputs("a")) == 4 and len(kept) == result["docs_out"] > 0
  rows = result["filters"]
  assert [r["filter"] for r in rows] == list(serial.filters)
  assert all(a["docs_out"] == b["docs_in"] for a, b in zip(rows, rows[1:]))
  assert result["labels"]["clean"]["in"] == sum(not r["labels"] for r in map(json.loads,
                                                                         open(raw_file)))
  assert "precision" in rows[0] and "| near_dedup |" in open(tmp_path / "a" / "report.md").read()
  cd.processes = 2
  parallel = from_configdict(cd)
  curate(parallel, f"jsonl:{raw_file}", tmp_path / "b")
  assert list(_digest(outputs("a")).values()) == list(_digest(outputs("b")).values())
  # Stopped half-way: the last phase of two shards and the final shards are missing.
  work = sorted((tmp_path / "a" / "work").glob("*"))
  last = max(int(p.name[1:].split("-")[0]) for p in work if p.name[0] == "p")
  redo = [w for w in work if w.name.startswith((f"p{last}-00000", f"p{last}-00001"))]
  for p in outputs("a")[:2] + redo:
    os.remove(p)
  untouched = {str(w): os.stat(w).st_mtime_ns for w in work if w not in redo}
  resumed = curate(serial, f"jsonl:{raw_file}", tmp_path / "a", targets=raw_corpus.TARGETS)
  assert resumed == result and _digest(outputs("a")) == _digest(outputs("b"))
  assert all(os.stat(w).st_mtime_ns == t for w, t in untouched.items())
  assert _digest([raw_file]) == before  # the input is never modified
  with pytest.raises(ConfigError, match="holds the shards of another run"):
    curate(from_configdict(curate_config.get_config("dedup")), f"jsonl:{raw_file}", tmp_path / "a")
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "notes.txt").write_text("mine")
  with pytest.raises(ConfigError, match="not empty"):
    curate(serial, f"jsonl:{raw_file}", tmp_path / "c")
  with pytest.raises(ConfigError, match="--input jsonl:/nonexistent.jsonl: no such file"):
    curate(serial, "jsonl:/nonexistent.jsonl", tmp_path / "d")
  # Input in another encoding is read with config.encoding, and refused without it.
  latin = tmp_path / "latin.txt"
  latin.write_bytes("Caf\u00e9 au lait, na\u00efve r\u00e9sum\u00e9 of a long day.".encode("latin-1"))
  with pytest.raises(ConfigError, match=r"not valid utf-8 .*set config.encoding to its"):
    curate(serial, f"text:{latin}", tmp_path / "e")
  cd.processes, cd.encoding = 1, "latin-1"
  assert curate(from_configdict(cd), f"text:{latin}", tmp_path / "f")["docs_in"] == 1


def test_curate_entry_point_prints_its_report(raw_file, tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "experiments.curate", "--config", "configs/curate.py",
       f"--input=jsonl:{raw_file}", f"--output={tmp_path / 'out'}", "--config.processes=1",
       "--config.filters=word_count,exact_dedup,pii"],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "| exact_dedup |" in result.stdout and "kept shards: jsonl:" in result.stdout
  assert (tmp_path / "out" / "report.json").exists()
