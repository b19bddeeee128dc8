"""Benchmarks: JSON results and plots under bench/results/. Targets live here, never in tests."""
