"""Benchmarks behind tools/bench_*.py."""
