"""Evaluation: per-token log-likelihood (any family), perplexity, unigram entropy; task
metrics (ROUGE, BLEU, exact match, accuracy) and k-shot task evaluation."""

from llm.eval.entropy import unigram_entropy
from llm.eval.likelihood import log_likelihood, perplexity, token_log_probs
from llm.eval.metrics import accuracy, bleu, exact_match, rouge
from llm.eval.tasks import (completion_log_likelihoods, evaluate_few_shot, evaluate_task,
                            greedy_generate, label_scores)

__all__ = ["accuracy", "bleu", "completion_log_likelihoods", "evaluate_few_shot",
           "evaluate_task", "exact_match", "greedy_generate", "label_scores", "log_likelihood",
           "perplexity", "rouge", "token_log_probs", "unigram_entropy"]
