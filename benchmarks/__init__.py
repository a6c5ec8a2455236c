"""Benchmarks of the featurization: `python -m benchmarks.featurize` (see BENCHMARKS.md)."""
