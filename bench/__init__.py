"""Benchmarks of fastalpha: `python bench/compare.py` (see docs/benchmarks.md)."""
