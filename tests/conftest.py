"""Fixtures shared by the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.wiring import Wired

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture
def examples_dir() -> Path:
    return EXAMPLES


@pytest.fixture
def wired() -> Wired:
    """The seams (Docker, Ollama, gateway, GPU probe, health) for this test: real until `wired.set(...)`."""
    return Wired()
