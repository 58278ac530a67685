"""Sampling and generation."""

from llm.inference.generate import generate, generate_seq2seq, init_cache, left_pad
from llm.inference.sampling import SamplingConfig, sample, top_k_filter, top_p_filter
