"""Errors raised by the solver.

    specs.errors.HomelabError
     ├── GGUFError          a file is missing, not GGUF, or truncated (message names the file)
     └── EstimateError      a bad estimator parameter (ngl out of range, context ≤ 0, …); also a ValueError

Every message is one user-facing line.
"""

from __future__ import annotations

from specs.errors import HomelabError


class GGUFError(HomelabError):
    """A GGUF file could not be read; the message names the file."""


class EstimateError(HomelabError, ValueError):
    """A parameter of a memory estimate is out of range or inconsistent."""
