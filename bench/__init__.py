"""Benchmarks of mirrorflow, run by hand: ``python -m bench.<name> [--quick]``.

Each benchmark starts what it measures on free loopback ports, compares it
with a baseline measured in the same run, prints a Markdown table and writes
JSON (and a PNG chart where one helps) under ``bench/results/``. The README's
"Performance" section lists them and the latest figures.
"""
