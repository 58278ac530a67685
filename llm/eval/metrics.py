"""Text metrics over (prediction, reference) strings, all in percent (0-100) as sacrebleu
reports BLEU: ROUGE-1/2/L through `rouge-score`, corpus BLEU through `sacrebleu`,
exact match after light normalisation, and accuracy of predicted labels."""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from llm.config import ConfigError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check_lengths(predictions: Sequence, references: Sequence):
  if len(predictions) != len(references):
    raise ConfigError(f"{len(predictions)} predictions but {len(references)} references; "
                      "score one prediction per reference")
  if not references:
    raise ConfigError("no examples to score; check the split and max_examples")


def rouge(predictions: Sequence[str], references: Sequence[str],
          use_stemmer: bool = True) -> dict[str, float]:
  """Mean ROUGE-1/2/L F-measures (the stemmer on, as T5's evaluation)."""
  _check_lengths(predictions, references)
  from rouge_score import rouge_scorer  # imports nltk and scipy: 1.5 s, only when scored
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
  scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
  return {name: 100.0 * float(np.mean([s[name].fmeasure for s in scores]))
          for name in ROUGE_TYPES}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """sacrebleu's corpus BLEU with its default 13a tokenizer, one reference each."""
  _check_lengths(predictions, references)
  import sacrebleu
  return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}


def normalize_answer(text: str) -> str:
  """Lower case, whitespace collapsed, surrounding punctuation and spaces dropped."""
  return re.sub(r"\s+", " ", text.lower()).strip(" \t\n.,;:!?\"'")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  _check_lengths(predictions, references)
  hits = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]
  return {"exact_match": 100.0 * float(np.mean(hits))}


def accuracy(predicted: Sequence[int], gold: Sequence[int]) -> dict[str, float]:
  _check_lengths(predicted, gold)
  return {"accuracy": 100.0 * float(np.mean(np.asarray(predicted) == np.asarray(gold)))}


# Metrics of generated text, by the name a task gives (`llm.data.tasks.Task.metric`).
GENERATION_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], dict[str, float]]] = {
    "rouge": rouge, "bleu": bleu, "exact_match": exact_match,
}
