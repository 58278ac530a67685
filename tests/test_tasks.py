"""Tests of task data: templates, few-shot prompts, SFT rows, the generated task suite,
mixtures and TFDS / JSONL tasks."""

import numpy as np
import pytest

from llm.config import ConfigError
from llm.data import sft, templates
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
