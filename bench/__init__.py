"""Benchmarks of fastalpha: `python bench/compare.py` (see README.md, "Performance")."""
