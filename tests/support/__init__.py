"""Helpers for tests and benchmarks (synthetic GGUF files); not used at run time."""
