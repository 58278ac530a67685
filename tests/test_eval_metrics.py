"""Tests of llm.eval.metrics and llm.eval.tasks: metric parity with rouge-score and
sacrebleu, label scoring against a NumPy recomputation, task evaluation end to end."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from llm import config as config_lib
from llm.config import ConfigError
from llm.data import tasks as tasks_lib
from llm.data.templates import few_shot
from llm.data.tokenizer import train_tokenizer
from llm.eval import metrics
from llm.eval import tasks as eval_tasks
from llm.models import build

VOCAB = 400
DECODER = dict(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4, d_ff=64, max_len=256)
T5 = dict(family="encoder_decoder", vocab_size=VOCAB, d_model=32, num_layers=1,
          num_decoder_layers=1, num_heads=4, d_ff=64, max_len=256, positions="relative",
          norm="rmsnorm", use_bias=False, activation="geglu", scale_attention=False,
          tie_embeddings=False)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [" ".join(pair) for name in tasks_lib.TASKS
           for pair in tasks_lib.get_task(name).pairs("train")[:200]]
  return train_tokenizer(texts, VOCAB, tmp_path_factory.mktemp("tok") / "t.model",
                         num_sentinels=2)


def _model(overrides, seed=0):
  """The module and random params drawn in NumPy from its param shapes: a jitted init
  would compile the whole model once more for nothing the tests need."""
  module = build(config_lib.model_from_dict(overrides))
  ones = np.ones((1, 8), np.int32)
  args = (ones, ones) if overrides.get("family") == "encoder_decoder" else (ones,)
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"])
  rng = np.random.default_rng(seed)
  # Wide weights, so that scores and greedy outputs differ between inputs.
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, s.dtype) if "scale" in jax.tree_util.keystr(path)
                       else rng.normal(0, 0.5, s.shape).astype(s.dtype)), shapes)
  return module, params


@pytest.fixture(scope="module")
def decoder():
  return _model(DECODER)


@pytest.fixture(scope="module")
def t5():
  return _model(T5)


# --- metrics --------------------------------------------------------------------

PREDICTIONS = ["the cat sat on the mat", "a dog ran in the park today", "nothing alike here"]
REFERENCES = ["the cat sat on a mat", "the dog ran in the big park", "entirely different words"]


def test_rouge_equals_rouge_score_and_a_hand_computation():
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  got = metrics.rouge(PREDICTIONS, REFERENCES)
  for name in metrics.ROUGE_TYPES:
    want = np.mean([scorer.score(r, p)[name].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)])
    assert got[name] == pytest.approx(100 * want, abs=1e-9)
  # "the cat sat" vs "the cat ran": 2 of 3 unigrams, 1 of 2 bigrams, LCS 2.
  hand = metrics.rouge(["the cat sat"], ["the cat ran"])
  assert hand == pytest.approx({"rouge1": 200 / 3, "rouge2": 50.0, "rougeL": 200 / 3})


def test_bleu_equals_sacrebleu():
  want = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
  assert metrics.bleu(PREDICTIONS, REFERENCES)["bleu"] == pytest.approx(want, abs=1e-9)
  assert 0 < want < 100
  assert metrics.bleu(REFERENCES, REFERENCES)["bleu"] == pytest.approx(100.0)


def test_exact_match_accuracy_and_errors():
  got = metrics.exact_match(["  Blue. ", "red", "dark  green", "pink"],
                            ["blue", "Red!", "dark green", "brown"])
  assert got == {"exact_match": 75.0}
  assert metrics.accuracy([0, 2, 1, 1, 3], [0, 2, 0, 1, 1]) == {"accuracy": 60.0}
  with pytest.raises(ConfigError, match="2 predictions but 1 references"):
    metrics.bleu(["a", "b"], ["a"])
  with pytest.raises(ConfigError, match="no examples"):
    metrics.exact_match([], [])


# --- label scoring --------------------------------------------------------------

PAIRS = [("Sentence: the pilot read about the rain today\nTopic:", " weather"),
         ("Sentence: a child", " animal"), ("Q", " food"), ("Sentence: my friend", " sport")]


def _numpy_log_likelihoods(module, params, tok, pairs):
  """Sum of log p(completion tokens, eos) per pair, from the logits of one model call
  on rows built here: right padding changes nothing that is scored (causal decoder;
  the encoder's padding is masked)."""
  prompts, completions = tok.encode_batch([p for p, _ in pairs]), tok.encode_batch(
      [c for _, c in pairs])
  if module.cfg.family == "decoder":
    rows = [[tok.bos_id, *p, *c] for p, c in zip(prompts, completions)]
    args = (_right_pad(rows, tok.pad_id),)
  else:
    rows = [[tok.pad_id, *c] for c in completions]
    encoder = _right_pad([[*p, tok.eos_id] for p in prompts], tok.pad_id)
    args = (encoder, _right_pad(rows, tok.pad_id), (encoder != tok.pad_id).astype(np.int32))
  shifted = np.asarray(jax.jit(module.apply)({"params": params}, *args), np.float64)
  shifted -= shifted.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  sums = []
  for row, c in enumerate(completions):
    targets = [*c, tok.eos_id]
    first = len(rows[row]) - len(targets)  # the logits that predict the completion
    sums.append(logp[row, np.arange(first, first + len(targets)), targets].sum())
  return np.array(sums)


def _right_pad(rows, pad_id):
  out = np.full((len(rows), max(map(len, rows))), pad_id, np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


@pytest.mark.parametrize("family", ["decoder", "t5"])
def test_completion_log_likelihoods_equal_numpy(family, decoder, t5, tok):
  module, params = decoder if family == "decoder" else t5
  got = eval_tasks.completion_log_likelihoods(module, params, tok, PAIRS, batch_size=3)
  np.testing.assert_allclose(got, _numpy_log_likelihoods(module, params, tok, PAIRS),
                             rtol=2e-4, atol=2e-4)
  assert len(set(np.round(got, 3))) == len(PAIRS)  # a real comparison, not all equal
  # Candidates per prompt, in order (same rows as above, so no new compile).
  scores = eval_tasks.label_scores(module, params, tok, [PAIRS[0][0], PAIRS[1][0]],
                                   [[" weather", " animal"], [" weather", " animal"]],
                                   batch_size=3)
  assert scores.shape == (2, 2)
  np.testing.assert_allclose(scores[:, 0][0], got[0], rtol=1e-5)
  np.testing.assert_allclose(scores[:, 1][1], got[1], rtol=1e-5)


def test_evaluate_classification_picks_the_most_likely_label(decoder, tok):
  module, params = decoder
  task = tasks_lib.get_task("topic")
  for k_shot in (0, 1):
    result = eval_tasks.evaluate_task(module, params, tok, task, "validation", k_shot=k_shot,
                                      max_examples=6, batch_size=8)
    records = task.records("validation")[:6]
    pairs = [few_shot(task.template, r, task.records("train"), k_shot, seed=[0, i],
                      tokenizer=tok, max_len=256) for i, r in enumerate(records)]
    scores = eval_tasks.label_scores(module, params, tok, [p for p, _ in pairs],
                                     [task.label_completions(r) for r in records], batch_size=8)
    gold = [task.labels.index(r["label"]) for r in records]
    assert result == {"accuracy": 100 * np.mean(scores.argmax(1) == gold), "n": 6}
    if k_shot:
      assert all(p.count("Topic:") == 2 for p, _ in pairs)


# --- generation tasks -----------------------------------------------------------

def _oracle(task, tok, split, answer=None):
  """A generate_fn that answers each prompt with its reference (or `answer`)."""
  by_prompt = {tuple([tok.bos_id, *tok.encode(p)]): c for p, c in task.pairs(split)}
  calls = []

  def generate_fn(prompt_ids, max_new_tokens):
    calls.append(max_new_tokens)
    return [tok.encode(answer or by_prompt[tuple(ids)]) + [tok.eos_id] for ids in prompt_ids]
  return generate_fn, calls


def test_evaluate_generation_metrics_with_an_oracle(decoder, tok):
  module, params = decoder
  for name, want in (("translate", {"bleu": 100.0}), ("facts", {"exact_match": 100.0}),
                     ("summary", {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})):
    task = tasks_lib.get_task(name)
    generate_fn, calls = _oracle(task, tok, "test")
    result = eval_tasks.evaluate_task(module, params, tok, task, max_examples=20,
                                      generate_fn=generate_fn)
    assert result == pytest.approx({**want, "n": 20})
    longest = max(len(tok.encode(c)) for _, c in task.pairs("test")[:20])
    assert calls == [longest + 1]
  task = tasks_lib.get_task("facts")
  generate_fn, _ = _oracle(task, tok, "test", answer=" Red.")
  answers = [r["answer"] for r in task.records("test")[:50]]
  result = eval_tasks.evaluate_task(module, params, tok, task, max_examples=50,
                                    generate_fn=generate_fn)
  assert result == {"exact_match": 100 * answers.count("red") / 50, "n": 50}


def test_evaluate_few_shot_prompts_hold_k_solved_examples(decoder, tok):
  task = tasks_lib.get_task("translate")
  by_query = dict(task.pairs("test"))
  seen = []

  def generate_fn(prompt_ids, max_new_tokens):
    prompts = [tok.decode(ids) for ids in prompt_ids]
    seen.append(prompts)
    return [tok.encode(by_query[p.split("\n\n")[-1]]) for p in prompts]

  results = eval_tasks.evaluate_few_shot(*decoder, tok, task, ks=(0, 2), max_examples=10,
                                         generate_fn=generate_fn)
  assert results == {0: {"bleu": pytest.approx(100.0), "n": 10},
                     2: {"bleu": pytest.approx(100.0), "n": 10}}
  zero, two = seen
  train = {"".join(pair) for pair in task.pairs("train")}
  for query, prompt in zip(zero, two):
    *shots, last = prompt.split("\n\n")
    assert last == query and len(shots) == 2 and set(shots) <= train
  assert len({p.split("\n\n")[0] for p in two}) > 1  # shots vary per query


def test_batched_greedy_generation_equals_one_call(decoder, t5, tok):
  module, params = decoder
  task = tasks_lib.get_task("facts")
  pairs = task.pairs("test")[:3]
  prompt_ids = [[tok.bos_id, *tok.encode(p)] for p, _ in pairs]
  max_new = max(len(tok.encode(c)) for _, c in pairs) + 1  # what evaluate_task picks
  chunked, whole = (eval_tasks.greedy_generate(module, params, prompt_ids, max_new,
                                               eos_id=tok.eos_id, batch_size=size)
                    for size in (2, 3))
  assert chunked == whole and len(chunked) == 3
  # The same compiled call inside evaluate_task, so its score is the one of `whole`.
  result = eval_tasks.evaluate_task(module, params, tok, task, max_examples=3, batch_size=3)
  assert result == {**metrics.exact_match([tok.decode(ids) for ids in whole],
                                          [c for _, c in pairs]), "n": 3}
  result = eval_tasks.evaluate_task(*t5, tok, task, k_shot=1, max_examples=3)
  assert set(result) == {"exact_match", "n"} and result["n"] == 3
  with pytest.raises(ConfigError, match="no split 'dev'"):
    eval_tasks.evaluate_task(module, params, tok, task, split="dev")
