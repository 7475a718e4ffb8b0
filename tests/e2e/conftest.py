"""The end-to-end scenario's step timings, printed at the end of the run (even with `pytest -q`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

_TIMINGS = pytest.StashKey["Timings"]()


@dataclass
class Timings:
    steps: list[tuple[str, float, str]] = field(default_factory=list)
    """(step, seconds, outcome)."""

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        outcome = "FAILED"
        try:
            yield
            outcome = "ok"
        finally:
            self.steps.append((name, time.monotonic() - started, outcome))


@pytest.fixture(scope="session")
def timings(request: pytest.FixtureRequest) -> Timings:
    t = Timings()
    request.config.stash[_TIMINGS] = t
    return t


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    t = config.stash.get(_TIMINGS, None)
    if t is None or not t.steps:
        return
    terminalreporter.section("end-to-end mission: step timings")
    for name, seconds, outcome in t.steps:
        terminalreporter.write_line(f"{seconds:7.1f} s  {outcome:<6}  {name}")
    terminalreporter.write_line(f"{sum(s for _, s, _ in t.steps):7.1f} s  total")
