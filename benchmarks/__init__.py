"""Benchmarks reproducing the paper's experiments; run each as ``python -m benchmarks.NAME``."""
