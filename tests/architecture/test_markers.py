"""The inner loop's markers: `real` and `slow` are set from where a test lives and what it uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _collected(*args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [line for line in out.splitlines() if "::" in line]


def test_real_and_slow_tests_are_left_out_of_the_inner_loop() -> None:
    paths = ["tests/llamacpp", "tests/integration/test_docker_driver.py", "tests/golden", "tests/specs/test_units.py"]
    everything = _collected(*paths)
    inner = _collected("-m", "not real and not slow", *paths)
    real = _collected("-m", "real", *paths)
    assert any("test_variants_real.py" in t for t in real)  # by its name
    assert any("test_docker_driver.py" in t for t in real)  # by its folder
    assert not any("test_variants.py::" in t for t in real)  # the pure half of the same folder
    assert not any("golden" in t or "_real" in t or "integration" in t for t in inner)
    assert any("test_units.py" in t for t in inner) and any("test_variants.py::" in t for t in inner)
    assert set(inner) < set(everything)
