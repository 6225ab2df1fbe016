"""Benchmarks: dlkernels against torch eager and torch.compile (see harness.py; run python -m bench)."""
