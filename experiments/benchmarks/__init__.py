"""Benchmarks run by experiments/bench.py; one module per benchmark with main(argv)."""
