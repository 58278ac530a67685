"""Evaluation metrics (perplexity, ROUGE, BLEU, few-shot land here)."""

import numpy as np


def unigram_entropy(targets: np.ndarray, weights: np.ndarray) -> float:
  """Entropy (nats/token) of the empirical unigram distribution of the weighted targets:
  the loss of the best model that ignores context, a floor any LM should beat."""
  ids = np.asarray(targets)[np.asarray(weights) > 0]
  counts = np.bincount(ids.ravel())
  probs = counts[counts > 0] / counts.sum()
  return float(-(probs * np.log(probs)).sum())
