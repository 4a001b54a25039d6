"""Benchmarks and diagnostics, outside the installed packages: run from the repository root (`python -m
bench.engine`, `bench/gpu.sh`); they use the product's own feed and engine."""
