"""Fixtures for the solver tests: synthetic GGUF files (the real Gemma 3 270M file is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.synth import SHAPES, SynthShape, write_synth_gguf


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="session")
def synth_files(synth_dir: Path) -> dict[str, tuple[SynthShape, Path]]:
    """Every shape of `tests.support.synth.SHAPES`, written once per session."""
    return {s.name: (s, write_synth_gguf(synth_dir / f"{s.name}.gguf", s)) for s in SHAPES}
