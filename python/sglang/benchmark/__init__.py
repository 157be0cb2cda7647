"""Pieces of `python -m sglang.bench_serving`: datasets, request backends, metrics."""
