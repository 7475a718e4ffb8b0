"""The watch collides with its own recovery (issue 28 item 6): applies of one process take turns on the lock
instead of failing with "another homelab apply is running (pid <its own pid>)"."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from controller.effects.apply import apply_lock


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
