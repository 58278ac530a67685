"""Preference records -> pairs, and the generated task's hidden rule (pure Python)."""

import itertools
import json

import numpy as np
import pytest

from llm.config import ConfigError
from llm.data import preferences as prefs
from llm.data.preferences import PreferencePair
from llm.data.task_sources import load_task


def test_a_ranking_of_k_becomes_its_k_choose_2_pairs_better_over_worse():
  completions = ["b", "d", "a", "c"]
  ranks = [2, 4, 1, 3]  # best first: a, b, c, d
  pairs = prefs.ranking_to_pairs("p", completions, ranks)
  assert len(pairs) == 6
  assert {(p.chosen, p.rejected) for p in pairs} == set(itertools.combinations("abcd", 2))
  assert all(p.prompt == "p" for p in pairs)


@pytest.mark.parametrize("completions, ranks, message", [
    (["a"], [1], "at least two completions"),
    (["a", "b", "c"], [1, 2, 2], "ranks [2] are tied; a ranking needs a strict order"),
    (["a", "b"], [1], "'ranks' has 1 entries for 2 completions"),
    (["a", "b"], [1, "2"], "must hold integers"),
])
def test_bad_rankings_are_refused_in_one_line(completions, ranks, message):
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    prefs.ranking_to_pairs("p", completions, ranks, where="x")


def test_pairwise_and_thumbs_records():
  records = [{"prompt": "p", "chosen": "good", "rejected": "bad"},
             {"prompt": "q", "completion": "u1", "thumbs": "up"},
             {"prompt": "q", "completion": "d1", "thumbs": "down"},
             {"prompt": "q", "completion": "u2", "thumbs": "up"},
             {"prompt": "r", "completion": "lonely", "thumbs": "up"}]  # no down: no pair
  assert prefs.records_to_pairs(records) == [
      PreferencePair("p", "good", "bad"), PreferencePair("q", "u1", "d1"),
      PreferencePair("q", "u2", "d1")]


def test_malformed_records_name_the_record_and_the_field(tmp_path):
  with pytest.raises(ConfigError, match="record 2: missing field 'rejected'"):
    prefs.records_to_pairs([{"prompt": "p", "chosen": "a", "rejected": "b"},
                            {"prompt": "p", "chosen": "a"}])
  with pytest.raises(ConfigError, match="record 1: field 'thumbs' must be 'up' or 'down'"):
    prefs.records_to_pairs([{"prompt": "p", "completion": "a", "thumbs": "meh"}])
  with pytest.raises(ConfigError, match="record 1: cannot tell the record kind"):
    prefs.records_to_pairs([{"prompt": "p", "text": "a"}])
  with pytest.raises(ConfigError, match="record 1: field 'prompt' must be a str"):
    prefs.records_to_pairs([{"prompt": 3, "chosen": "a", "rejected": "b"}])
  path = tmp_path / "prefs.jsonl"
  path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n{oops\n")
  with pytest.raises(ConfigError, match="prefs.jsonl line 2: not JSON"):
    prefs.preference_pairs(f"jsonl:{path}", "train")


def test_jsonl_preferences_hold_out_their_last_records(tmp_path):
  path = tmp_path / "p.jsonl"
  lines = [{"prompt": f"p{i}", "completions": ["a", "b", "c"], "ranks": [3, 1, 2]}
           for i in range(20)]
  path.write_text("".join(json.dumps(r) + "\n" for r in lines))
  train = prefs.preference_pairs(f"jsonl:{path}", "train")
  held = prefs.preference_pairs(f"jsonl:{path}", "validation")
  assert len(train) == 19 * 3 and len(held) == 3
  assert held[0] == PreferencePair("p19", "b", "c")


@pytest.mark.parametrize("completion, score", [
    (" it is great and dirty.", 0.0), (" it is great and lovely and fresh.", 3.0),
    (" it is broken.", -1.0), (" it is small and blue.", 0.0),
    (" it is great and great.", prefs.MALFORMED_SCORE),  # repeated
    (" it is great", prefs.MALFORMED_SCORE),  # no period
    (" it is great and warm and sweet and fresh.", prefs.MALFORMED_SCORE),  # four
    (" it is grand.", prefs.MALFORMED_SCORE), (" great great great", prefs.MALFORMED_SCORE)])
def test_the_hidden_rule(completion, score):
  assert prefs.true_score(completion) == score


def test_the_noisy_labeler_mostly_agrees_with_the_hidden_rule_and_is_reproducible():
  records = prefs.review_rankings("validation")
  assert records == prefs.review_rankings("validation", seed=0)
  assert records != prefs.review_rankings("validation", seed=1)
  pairs = prefs.records_to_pairs(records)
  assert len(pairs) == 6 * len(records)
  scored = [(prefs.true_score(p.chosen), prefs.true_score(p.rejected)) for p in pairs]
  agree = np.mean([c > r for c, r in scored if c != r])
  assert 0.85 < agree < 1.0  # noisy, as annotators are, but informative
  demos = load_task("review").pairs("train")  # as data.tasks=review loads it
  assert demos[0][0].startswith("Review of the ") and demos[0][1].startswith(" it is ")
