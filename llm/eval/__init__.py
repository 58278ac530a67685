"""Evaluation: per-token log-likelihood (any family), perplexity, unigram entropy."""

from llm.eval.entropy import unigram_entropy
from llm.eval.likelihood import log_likelihood, perplexity, token_log_probs

__all__ = ["log_likelihood", "perplexity", "token_log_probs", "unigram_entropy"]
