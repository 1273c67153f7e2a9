"""Evaluating language models on tokens: which tokens (shards or text), sliding-window scoring, and the paired
comparison of two models on the same tokens (the damage report of quantization, merging, extraction)."""
