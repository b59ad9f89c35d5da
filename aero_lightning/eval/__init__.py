"""Evaluation: benchmark registry, sources, long-form builder and batched decoding."""
