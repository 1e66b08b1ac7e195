"""Benchmarks: figures to read side by side, never pass/fail timing asserts (see bench/README.md)."""
