"""The watch collides with its own recovery (issue 28 item 6): applies of one process take turns on the lock
instead of failing with "another homelab apply is running (pid <its own pid>)"."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from controller.drivers.fake import FakeDockerNode
from controller.effects.apply import Executor, LockHeld, StalePlan, apply_lock
from controller.effects.watch import FileSource, Metrics, Worker
from tests.controller.test_watch import Said, engines
from tests.support.wiring import Wired

__all__ = ["engines"]  # the fixture, shared with test_watch.py


def test_a_second_apply_in_the_same_process_waits_for_the_first(tmp_path: Path) -> None:
    order: list[str] = []
    first_in = threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        with apply_lock(tmp_path, "lab"):
            order.append("first in")
            first_in.set()
            time.sleep(0.3)
            order.append("first out")

    def second() -> None:
        first_in.wait(5)
        try:
            with apply_lock(tmp_path, "lab"):
                order.append("second in")
        except BaseException as exc:  # LockHeld naming this process's own pid, before the fix
            errors.append(exc)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert order == ["first in", "first out", "second in"]


@pytest.mark.parametrize(
    "raised",
    [
        StalePlan("the cluster changed since this plan was made (another apply?)"),
        LockHeld("another homelab apply is running (pid 1)"),
    ],
    ids=["stale-plan", "lock-held"],
)
def test_a_deferred_reconcile_is_not_counted_as_a_failure(
    raised: LockHeld, engines: dict[str, FakeDockerNode], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wired: Wired
) -> None:
    """The watch's own recovery (or a `homelab reconcile`) applied first: the watch's plan is stale, or the lock is
    held. Nothing failed: `homelab_reconcile_deferred_total` counts it, `homelab_reconcile_failures_total` does not."""
    spec = tmp_path / "cluster.yaml"  # the fixture wrote it: two fake engines, nothing running yet

    def apply(self: Executor, plan: object) -> None:
        raise raised

    monkeypatch.setattr(Executor, "apply", apply)
    metrics, said = Metrics(), Said()
    result = Worker(FileSource(spec), tmp_path / "state", False, metrics, said, wired.wiring).run("interval")
    assert not result["ok"] and result["deferred"] and "will retry at the next interval" in result["error"]
    scraped = generate_latest(metrics.registry).decode()
    assert "homelab_reconcile_failures_total 0.0" in scraped
    assert "homelab_reconcile_deferred_total 1.0" in scraped
