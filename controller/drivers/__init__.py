"""Thin drivers, one per outside system, each behind a small Protocol."""
