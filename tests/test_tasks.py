"""Tests of task data: templates, few-shot prompts, SFT rows, the generated task suite,
mixtures and TFDS / JSONL tasks."""

import numpy as np
import pytest

from llm.config import ConfigError
from llm.data import mixture, sft, task_sources, templates
from llm.data import tasks as tasks_lib
from llm.data.sources import DataError
from llm.data.tokenizer import train_tokenizer

TEXTS = [f"the {a} {b} saw {c} birds near the river {d} times" for a in ("red", "blue", "old")
         for b in ("cat", "dog", "fox") for c in range(10) for d in ("two", "five")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return train_tokenizer(TEXTS, 320, path, num_sentinels=2)


# --- templates ------------------------------------------------------------------

TEMPLATE = templates.Template("Q: {question}\nA:", " {answer}", name="qa")
POOL = [{"question": f"what is {i} plus one", "answer": str(i + 1)} for i in range(20)]


def test_template_apply_and_missing_field():
  assert TEMPLATE.fields == ("question", "answer")
  assert TEMPLATE.apply(POOL[3]) == ("Q: what is 3 plus one\nA:", " 4")
  with pytest.raises(ConfigError, match=r"field 'answer'.*record has only: question, text;"):
    TEMPLATE.apply({"question": "q", "text": "t"})
  with pytest.raises(ConfigError, match="positional"):
    templates.Template("{}", "")
  with pytest.raises(ConfigError, match="format string"):
    templates.Template("{unclosed", "")


def test_few_shot_examples_and_query_exclusion(tok):
  query = POOL[5]
  prompt, completion = templates.few_shot(TEMPLATE, query, POOL, 3, seed=1, tokenizer=tok,
                                          max_len=1000)
  shots = templates.choose_shots(POOL, 3, seed=1, query=query)
  assert len(shots) == 3 and query not in shots
  assert prompt.count("Q: ") == 4 and prompt.endswith("Q: what is 5 plus one\nA:")
  for shot in shots:
    assert "".join(TEMPLATE.apply(shot)) + "\n\n" in prompt
  assert completion == " 6"
  # Same seed, same shots; the query is skipped even when the seed would pick it.
  assert templates.choose_shots(POOL, 3, seed=1, query=query) == shots
  first = templates.choose_shots(POOL, 1, seed=1)[0]
  assert first not in templates.choose_shots(POOL, 5, seed=1, query=first)
  assert templates.few_shot(TEMPLATE, query, POOL, 0, seed=1, tokenizer=tok,
                            max_len=1000) == TEMPLATE.apply(query)
  with pytest.raises(ConfigError, match="pool has only 19"):
    templates.choose_shots(POOL, 20, seed=0, query=query)


def test_few_shot_largest_k_that_fits(tok):
  query = POOL[0]
  lengths = [len(tok.encode(templates.few_shot(TEMPLATE, query, POOL, k, seed=0, tokenizer=tok,
                                               max_len=10_000)[0])) for k in range(6)]
  assert lengths == sorted(lengths) and len(set(lengths)) == 6
  max_len = lengths[3] + 4  # room for 3 shots and the 4 reserved tokens, not 4 shots
  templates.few_shot(TEMPLATE, query, POOL, 3, seed=0, tokenizer=tok, max_len=max_len, reserve=4)
  with pytest.raises(ConfigError, match=r"k_shot=5: .* the largest k that fits is 3$"):
    templates.few_shot(TEMPLATE, query, POOL, 5, seed=0, tokenizer=tok, max_len=max_len,
                       reserve=4)
  with pytest.raises(ConfigError, match="even the query alone does not fit"):
    templates.few_shot(TEMPLATE, query, POOL, 2, seed=0, tokenizer=tok, max_len=3)


# --- SFT rows -------------------------------------------------------------------

PAIRS = [("the red cat saw", " two birds"), ("the old fox", " near the river five times"),
         ("blue", "")]


def test_sft_decoder_rows(tok):
  rows, truncated = sft.sft_rows(PAIRS, tok, 16, "decoder")
  assert truncated == 0
  assert set(rows) == {"inputs", "targets", "weights", "segment_ids", "positions"}
  for row, (prompt, completion) in enumerate(PAIRS):
    p, c = tok.encode(prompt), tok.encode(completion)
    n = len(p) + len(c) + 1
    tokens = [tok.bos_id, *p, *c, tok.eos_id]
    np.testing.assert_array_equal(rows["inputs"][row, :n], tokens[:-1])
    np.testing.assert_array_equal(rows["targets"][row, :n], tokens[1:])
    np.testing.assert_array_equal(rows["inputs"][row, n:], tok.pad_id)
    # The loss is on exactly the completion's tokens and the final eos.
    weighted = rows["targets"][row][rows["weights"][row] == 1.0]
    np.testing.assert_array_equal(weighted, [*c, tok.eos_id])
    assert rows["weights"][row].sum() == len(c) + 1
    np.testing.assert_array_equal(rows["segment_ids"][row], np.arange(16) < n)
    np.testing.assert_array_equal(rows["positions"][row, :n], np.arange(n))
    assert not rows["positions"][row, n:].any()


def test_sft_truncates_prompt_from_the_left(tok):
  prompt, completion = PAIRS[1]
  p, c = tok.encode(prompt), tok.encode(completion)
  seq_len = len(c) + 3  # room for two prompt tokens
  rows, truncated = sft.sft_rows([PAIRS[1], ("blue", " cat")], tok, seq_len, "decoder")
  assert truncated == 1
  np.testing.assert_array_equal(rows["inputs"][0], [tok.bos_id, *p[-2:], *c])
  np.testing.assert_array_equal(rows["targets"][0], [*p[-2:], *c, tok.eos_id])
  assert rows["weights"][0].sum() == len(c) + 1
  with pytest.raises(ConfigError, match=r"example 0: its completion takes .*data\.seq_len=4"):
    sft.sft_rows([PAIRS[1]], tok, 4, "decoder")


def test_sft_encoder_decoder_rows(tok):
  rows, truncated = sft.sft_rows(PAIRS, tok, 12, "encoder_decoder", start_id=7)
  assert truncated == 0
  for row, (prompt, completion) in enumerate(PAIRS):
    p, c = tok.encode(prompt), tok.encode(completion)
    np.testing.assert_array_equal(rows["encoder_inputs"][row, :len(p) + 1], [*p, tok.eos_id])
    assert rows["encoder_segment_ids"][row].sum() == len(p) + 1
    np.testing.assert_array_equal(rows["inputs"][row, :len(c) + 1], [7, *c])
    np.testing.assert_array_equal(rows["targets"][row, :len(c) + 1], [*c, tok.eos_id])
    np.testing.assert_array_equal(rows["weights"][row], np.arange(12) < len(c) + 1)
    np.testing.assert_array_equal(rows["segment_ids"][row], rows["weights"][row])
  long_prompt = " ".join(["the red cat"] * 10)
  rows, truncated = sft.sft_rows([(long_prompt, " two")], tok, 6, "encoder_decoder")
  assert truncated == 1
  np.testing.assert_array_equal(rows["encoder_inputs"][0],
                                [*tok.encode(long_prompt)[-5:], tok.eos_id])
  assert rows["inputs"][0, 0] == tok.pad_id  # T5's decoder start by default


def test_sft_encoder_rows(tok):
  pairs = [("the red cat", " cat"), ("the old fox", " fox"), ("the red cat saw", " cat")]
  rows, truncated = sft.sft_rows(pairs, tok, 24, "encoder", labels=("dog", "cat", "fox"))
  np.testing.assert_array_equal(rows["labels"], [1, 2, 1])
  p = tok.encode("the red cat")
  np.testing.assert_array_equal(rows["inputs"][0, :len(p) + 2], [tok.bos_id, *p, tok.eos_id])
  assert truncated == 0 and set(rows) == {"inputs", "segment_ids", "positions", "labels"}
  with pytest.raises(ConfigError, match="not one of the labels"):
    sft.sft_rows([("x", " bird")], tok, 8, "encoder", labels=("dog", "cat"))
  with pytest.raises(ConfigError, match="needs labels"):
    sft.sft_rows([("x", " bird")], tok, 8, "encoder")
  with pytest.raises(ConfigError, match="model.family='moe'"):
    sft.sft_rows(pairs, tok, 8, "moe")


# --- generated tasks ------------------------------------------------------------

@pytest.fixture(scope="module")
def suite():
  return {name: tasks_lib.get_task(name) for name in tasks_lib.TASKS}


def test_tasks_deterministic_with_disjoint_splits(suite):
  assert set(suite) == {"topic", "summary", "translate", "facts"}
  for name, task in suite.items():
    again, other = tasks_lib.get_task(name, seed=0), tasks_lib.get_task(name, seed=1)
    assert again.splits == task.splits and other.splits != task.splits
    sizes = {split: len(task.records(split)) for split in tasks_lib.SPLITS}
    assert sizes == tasks_lib.SPLIT_SIZES
    prompts = {split: {p for p, _ in task.pairs(split)} for split in tasks_lib.SPLITS}
    assert sum(map(len, prompts.values())) == sum(sizes.values())  # no input repeats
    assert task.metric in tasks_lib.METRICS
  # Known answers.
  for record in suite["translate"].records("test"):
    assert record["target"] == tasks_lib.cipher(record["source"])
    assert len(record["target"].split()) == len(record["source"].split())
  for record in suite["facts"].records("test"):
    asked = record["question"].split()[-1].rstrip("?")
    assert f"The {asked} is {record['answer']}." in record["context"]
  for record in suite["summary"].records("test"):
    assert record["article"].startswith(record["summary"] + " ")
  topic = suite["topic"]
  labels = [r["label"] for r in topic.records("train")]
  assert set(labels) == set(topic.labels) and min(map(labels.count, topic.labels)) > 400
  for record in topic.records("test"):
    nouns = tasks_lib.TOPIC_NOUNS[record["label"]]
    assert sum(word in nouns for word in record["text"].split()) == 2
  assert topic.label_completions(topic.records("test")[0]) == [" " + l for l in topic.labels]
  with pytest.raises(ConfigError, match="unknown; generated tasks: topic, summary"):
    tasks_lib.get_task("sst2")
  with pytest.raises(ConfigError, match="no split 'dev'; it has: train, validation, test"):
    topic.records("dev")


# --- mixtures -------------------------------------------------------------------

def _small_task(name, size):
  records = tuple({"x": f"{name} {i}", "y": str(i)} for i in range(size))
  return tasks_lib.Task(name, {"train": records}, templates.Template("{x}", " {y}"),
                        "exact_match")


def test_mixture_rates_resumable_and_epochs():
  tasks = [_small_task("a", 50), _small_task("b", 500), _small_task("c", 5000)]
  assert mixture.mixing_rates(tasks) == pytest.approx((50 / 5550, 500 / 5550, 5000 / 5550))
  capped = mixture.Mixture(tasks, cap=500, seed=3)
  assert capped.rates == pytest.approx((50 / 1050, 500 / 1050, 500 / 1050))
  explicit = mixture.Mixture(tasks, rates={"a": 1, "b": 1, "c": 2}, seed=3)
  assert explicit.rates == pytest.approx((0.25, 0.25, 0.5))
  n = 20_000
  for mix in (capped, explicit):
    counts = np.bincount(mix.task_indices(0, n), minlength=3)
    p = np.asarray(mix.rates)
    assert np.all(np.abs(counts - n * p) <= 5 * np.sqrt(n * p * (1 - p)))  # binomial bound
  # Resuming at any example index gives exactly the rest of the stream.
  whole = capped.draws(0, 9000)
  assert capped.draws(4000, 5000) == whole[4000:] and capped.draws(8191, 3) == whole[8191:8194]
  assert mixture.Mixture(tasks, cap=500, seed=3).draws(0, 9000) == whole
  assert mixture.Mixture(tasks, cap=500, seed=4).draws(0, 100) != whole[:100]
  # Each task's records come in a fresh permutation every epoch.
  a_records = [r["x"] for name, r in whole if name == "a"]
  assert len(a_records) > 100
  assert sorted(a_records[:50]) == sorted(f"a {i}" for i in range(50))
  assert sorted(a_records[50:100]) == sorted(a_records[:50]) and a_records[50:100] != a_records[:50]
  names = {"a": tasks[0], "b": tasks[1], "c": tasks[2]}
  assert capped.pairs(10, 5) == [names[t].template.apply(r) for t, r in whole[10:15]]
  with pytest.raises(ConfigError, match=r"tasks without a rate \['c'\]"):
    mixture.Mixture(tasks, rates={"a": 1, "b": 1})
  with pytest.raises(ConfigError, match="not both"):
    mixture.Mixture(tasks, rates={"a": 1, "b": 1, "c": 1}, cap=10)
  with pytest.raises(ConfigError, match="positive sum"):
    mixture.Mixture(tasks, rates={"a": 0, "b": 0, "c": 0})


# --- TFDS and JSONL tasks -------------------------------------------------------

def test_tfds_tasks_from_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=5):
    sst2 = task_sources.load_task("tfds:glue/sst2")
    samsum = task_sources.tfds_task("samsum", limit=3)
    wmt = task_sources.tfds_task("wmt14_translate/de-en")
  assert set(sst2.splits) == {"train", "validation"} and len(sst2.records("train")) == 5
  assert sst2.metric == "accuracy" and sst2.labels == ("negative", "positive")
  for record in sst2.records("validation"):
    assert set(record) == {"sentence", "label"} and record["label"] in sst2.labels
    assert isinstance(record["sentence"], str)
  prompt, completion = sst2.pairs("train")[0]
  assert prompt.startswith("Review: ") and completion in (" negative", " positive")
  assert [len(samsum.records(s)) for s in ("train", "validation", "test")] == [3, 3, 3]
  assert samsum.metric == "rouge" and set(samsum.records("test")[0]) == {"dialogue", "summary"}
  assert wmt.metric == "bleu" and wmt.template.prompt.startswith("Translate German to English")
  assert wmt.pairs("test")[0][1] == " " + wmt.records("test")[0]["en"]
  # Not prepared and not mocked: fails at once, downloads nothing.
  with pytest.raises(DataError, match="not prepared in .*tfds_download=True"):
    task_sources.tfds_task("glue/sst2", data_dir=str(tmp_path))
  with pytest.raises(ConfigError, match="TFDS task 'squad' is unknown"):
    task_sources.tfds_task("squad")


def test_jsonl_task(tmp_path):
  train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
  train.write_text('{"q": "2+2", "a": "4", "extra": 1}\n\n{"q": "1+2", "a": "3"}\n')
  test.write_text('{"q": "3+3", "a": "6"}\n')
  template = templates.Template("Q: {q}\nA:", " {a}")
  task = task_sources.jsonl_task("sums", {"train": str(train), "test": str(test)}, template,
                                 "exact_match")
  assert task.pairs("train") == [("Q: 2+2\nA:", " 4"), ("Q: 1+2\nA:", " 3")]
  assert task.pairs("test") == [("Q: 3+3\nA:", " 6")]
  with pytest.raises(ConfigError, match="uses field 'answer' but the record has only: a, extra"):
    task_sources.jsonl_task("sums", {"train": str(train)}, templates.Template("{q}", "{answer}"),
                            "exact_match")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"q": "1", "a": "2"}\n{"q": oops}\n')
  with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
    task_sources.jsonl_task("sums", {"train": str(bad)}, template, "exact_match")
  with pytest.raises(DataError, match="missing.jsonl"):
    task_sources.jsonl_task("sums", {"train": str(tmp_path / "missing.jsonl")}, template,
                            "exact_match")
  with pytest.raises(DataError, match="label '4' is not one of"):
    task_sources.jsonl_task("sums", {"train": str(train)}, template, "accuracy", labels=("3",),
                            label_field="a")
  assert task_sources.load_task("facts", seed=2).splits == tasks_lib.get_task("facts", 2).splits
