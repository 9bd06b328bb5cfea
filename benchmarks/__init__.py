"""Benchmarks (not tests): ``python -m benchmarks.bench_round``; results go to ``benchmarks/results/`` (git-ignored)."""
