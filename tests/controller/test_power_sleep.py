"""A sleep command that does not detach (issue 28 item 5): the power state machine owns it.

The node's SSH and Docker are fakes (a NodeActions whose command and probes are scripted); nothing runs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from controller.drivers.base import CommandFailed
from controller.effects.engine import Wiring
from controller.effects.power import PowerStore, sleep_node
from controller.effects.recovery import NodeActions, Observation, Reach
from tests.controller.test_power import spec


class Node(NodeActions):
    """The node `box`: `outcome` is what the sleep command ends with; it stops answering `answers` probes later
    (None: it never stops)."""

    def __init__(self, tmp: Path, outcome: Observation | Exception, answers: int | None, store: PowerStore) -> None:
        s = spec()
        super().__init__(s, s.node("box"), tmp, wiring=Wiring())
        self.outcome = outcome
        self.answers = answers
        self.store = store
        self.during: list[set[str]] = []
        """What the power state said while the command ran."""

    async def run_on_node(self, command: str, timeout: float) -> Observation:
        self.during.append(self.store.asleep())
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    async def probe_ssh(self) -> Observation:
        if self.answers is None or self.answers > 0:
            if self.answers is not None:
                self.answers -= 1
            return Observation(ssh=Reach.UP)
        return Observation(ssh=Reach.DOWN, detail="connection refused")

    async def probe_docker(self) -> Observation:
        return Observation(docker=False, detail="connection refused")


def _sleep(tmp: Path, outcome: Observation | Exception, answers: int | None) -> tuple[bool, str, Node, list[Any]]:
    s = spec()
    store = PowerStore.of(s, tmp)
    node = Node(tmp, outcome, answers, store)
    events: list[Any] = []
    ok, message = asyncio.run(
        sleep_node(
            s, s.node("box"), tmp, Wiring(), emit=lambda kind, **kw: events.append((kind, kw)), reason="idle 30 s",
            actions=node, grace=0.3, every=0.01,
        )
    )  # fmt: skip
    return ok, message, node, events


@pytest.mark.parametrize(
    "outcome",
    [
        Observation(ok=False, detail="exit -1: "),  # the SSH session lost under the suspend
        Observation(ok=False, detail="exit 255: "),
        CommandFailed("node box: systemctl timed out after 60 s (over ssh)"),
    ],
)
def test_a_dropped_sleep_command_is_success_when_the_node_stops_answering(
    tmp_path: Path, outcome: Observation | Exception
) -> None:
    ok, message, node, events = _sleep(tmp_path, outcome, answers=2)
    assert ok, message
    assert PowerStore.of(spec(), tmp_path).asleep() == {"box"}
    assert node.during == [{"box"}]  # recorded asleep before the command ran: recovery leaves it alone
    assert [k for k, _ in events] == ["node-sleep", "node-asleep"]


def test_a_dropped_sleep_command_while_the_node_still_answers_fails_with_a_reason(tmp_path: Path) -> None:
    ok, message, _, events = _sleep(tmp_path, Observation(ok=False, detail="exit -1: "), answers=None)
    assert not ok
    assert message.startswith("node box: the sleep command failed: exit -1 (the connection dropped); its SSH")
    assert "still answers" in message
    assert PowerStore.of(spec(), tmp_path).asleep() == set()  # not asleep: neither health nor recovery think so
    assert events[-1][0] == "node-sleep-failed" and events[-1][1]["error"]


def test_a_failed_sleep_command_never_has_an_empty_reason(tmp_path: Path) -> None:
    ok, message, _, events = _sleep(tmp_path, Observation(ok=False, detail="exit 1: "), answers=0)
    assert not ok and message == "node box: the sleep command failed: exit 1"
    assert events[-1][1]["error"] == "exit 1"
    assert PowerStore.of(spec(), tmp_path).asleep() == set()


def test_a_sleep_command_that_returns_0_is_asleep(tmp_path: Path) -> None:
    ok, message, _, _ = _sleep(tmp_path, Observation(ok=True), answers=None)
    assert ok and message == "node box: asleep (idle 30 s)"
    assert PowerStore.of(spec(), tmp_path).asleep() == {"box"}
