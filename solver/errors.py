"""Errors raised by the solver.

    Exception
     ├── GGUFError          a file is missing, not GGUF, or truncated (message names the file)
     └── ValueError
          └── EstimateError a bad estimator parameter (ngl out of range, context ≤ 0, …)

Every message is one user-facing line.
"""

from __future__ import annotations


class GGUFError(Exception):
    """A GGUF file could not be read; the message names the file."""


class EstimateError(ValueError):
    """A parameter of a memory estimate is out of range or inconsistent."""
