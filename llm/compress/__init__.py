"""Compression: distillation into a smaller student, magnitude and N:M pruning (int8 /
int4 weights: `llm.inference.quantize`)."""
