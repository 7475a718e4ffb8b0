"""Recovery's pure core (the transition table, backoff) and its runner in fake time; secrets; the WoL packet."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path

import pytest

from controller.drivers.secrets import MASK, Redactor, SecretError, resolve
from controller.drivers.wake import is_broadcast, magic_packet, send_magic_packet
from controller.effects.recovery import (
    Abilities,
    AttemptStore,
    Decision,
    Observation,
    Reach,
    Recoverer,
    Status,
    Step,
    backoff_delay,
    due,
    due_nodes,
    node_hash,
    predicted_path,
    transition,
)
from specs import parse_spec
from specs.model import Backoff, ClusterSpec

CAN = Abilities(can_wake=True, can_shell=True)
NO_WAKE = Abilities(can_wake=False, can_shell=True)

# ------------------------------------------------------------------ the transition table

Obs = Observation
CASES: list[tuple[Step, Observation, Abilities, Step]] = [
    (Step.PROBE, Obs(ssh=Reach.UP, docker=True, healthy=True), CAN, Step.DONE),
    (Step.PROBE, Obs(ssh=Reach.UP, docker=False, healthy=False), CAN, Step.RESTART_DOCKER),
    (Step.PROBE, Obs(ssh=Reach.UP, docker=True, healthy=False), CAN, Step.RESTART_CONTAINERS),
    (Step.PROBE, Obs(ssh=Reach.DOWN, docker=False, healthy=False), CAN, Step.WAKE),
    (Step.PROBE, Obs(ssh=Reach.DOWN, docker=False, healthy=False), NO_WAKE, Step.RETRY),
    (Step.PROBE, Obs(ssh=Reach.DOWN, docker=True, healthy=False), CAN, Step.WAKE),
    (Step.PROBE, Obs(ssh=Reach.DOWN, docker=True, healthy=False), NO_WAKE, Step.RESTART_CONTAINERS),
    (Step.PROBE, Obs(ssh=Reach.REJECTED, docker=False, healthy=False), CAN, Step.GIVE_UP),
    (Step.PROBE, Obs(ssh=Reach.DENIED, docker=False, healthy=False), CAN, Step.GIVE_UP),
    (Step.PROBE, Obs(ssh=Reach.NO_SSH, docker=False, healthy=False), CAN, Step.GIVE_UP),
    (Step.PROBE, Obs(ssh=Reach.NO_SSH, docker=True, healthy=False), CAN, Step.RESTART_CONTAINERS),
    (Step.RESTART_DOCKER, Obs(ok=True), CAN, Step.WAIT_DOCKER),
    (Step.RESTART_DOCKER, Obs(ok=False, detail="exit 1"), CAN, Step.RETRY),
    (Step.WAKE, Obs(ok=True), CAN, Step.WAIT_SSH),
    (Step.WAKE, Obs(ok=False), CAN, Step.RETRY),
    (Step.WAIT_SSH, Obs(ssh=Reach.UP), CAN, Step.WAIT_DOCKER),
    (Step.WAIT_SSH, Obs(ssh=Reach.DOWN, ok=False), CAN, Step.RETRY),
    (Step.WAIT_SSH, Obs(ssh=Reach.REJECTED), CAN, Step.GIVE_UP),
    (Step.WAIT_DOCKER, Obs(docker=True), CAN, Step.RESTART_CONTAINERS),
    (Step.WAIT_DOCKER, Obs(docker=False, ok=False), CAN, Step.RETRY),
    (Step.RESTART_CONTAINERS, Obs(ok=True), CAN, Step.RECHECK),
    (Step.RESTART_CONTAINERS, Obs(ok=False), CAN, Step.RETRY),
    (Step.RECHECK, Obs(healthy=True), CAN, Step.DONE),
    (Step.RECHECK, Obs(healthy=False), CAN, Step.RETRY),
]


@pytest.mark.parametrize(("done", "obs", "can", "expected"), CASES)
def test_transition(done: Step, obs: Observation, can: Abilities, expected: Step) -> None:
    assert transition(done, obs, can).step is expected


def test_final_steps_have_no_successor() -> None:
    with pytest.raises(ValueError, match="final step"):
        transition(Step.DONE, Obs(), CAN)


def test_predicted_path_for_a_sleeping_node() -> None:
    path = predicted_path(Obs(ssh=Reach.DOWN, docker=False, healthy=False), CAN)
    assert [d.step for d in path] == [
        Step.WAKE,
        Step.WAIT_SSH,
        Step.WAIT_DOCKER,
        Step.RESTART_CONTAINERS,
        Step.RECHECK,
        Step.DONE,
    ]


# ------------------------------------------------------------------ backoff


def test_backoff_grows_caps_and_jitters_within_bounds() -> None:
    b = Backoff(initial=10, max=100, factor=2, jitter=0)
    assert [backoff_delay(n, b, random.Random(1)) for n in range(1, 7)] == [10, 20, 40, 80, 100, 100]
    jittery = Backoff(initial=10, max=100, factor=2, jitter=0.2)
    rng = random.Random(7)
    for n, base in [(1, 10), (2, 20), (3, 40)]:
        for _ in range(50):
            assert base * 0.8 <= backoff_delay(n, jittery, rng) <= base * 1.2
    assert backoff_delay(9, jittery, rng) <= 100  # never above max, jitter included
    # the same seed gives the same delays
    assert [backoff_delay(2, jittery, random.Random(3)) for _ in range(2)] == [
        backoff_delay(2, jittery, random.Random(3))
    ] * 2


# ------------------------------------------------------------------ the runner, in fake time

SPEC = """\
cluster: {name: lab}
nodes:
  - name: box
    tier: remote
    address: 192.0.2.10
    ssh: {user: homelab}
    docker: {endpoint: "ssh://homelab@192.0.2.10"}
    ram: 8GiB
    llamacpp: {image: x, ports: 3000-3009}
    wake: {wol: {mac: "aa:bb:cc:dd:ee:ff"}}
recovery:
  attempts: 3
  backoff: {initial: 10s, max: 10m, factor: 3, jitter: 0.2}
  wait_ssh: 60s
  wait_docker: 30s
"""


def spec() -> ClusterSpec:
    return parse_spec(SPEC, "cluster.yaml").spec


class FakeTime:
    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Scripted:
    """Actions whose observations come from a script; records every call."""

    def __init__(self, **script: list[Observation]) -> None:
        self.script = script
        self.calls: list[str] = []

    async def _next(self, name: str) -> Observation:
        self.calls.append(name)
        queue = self.script[name]
        return queue.pop(0) if len(queue) > 1 else queue[0]

    async def probe(self) -> Observation:
        return await self._next("probe")

    async def probe_ssh(self) -> Observation:
        return await self._next("probe_ssh")

    async def probe_docker(self) -> Observation:
        return await self._next("probe_docker")

    async def restart_docker(self) -> Observation:
        return await self._next("restart_docker")

    async def wake(self) -> Observation:
        return await self._next("wake")

    async def restart_containers(self) -> Observation:
        return await self._next("restart_containers")

    async def recheck(self) -> Observation:
        return await self._next("recheck")

    def describe(self, step: Step) -> str:
        return step.value


def run(recoverer: Recoverer, *, once: bool = False, resume: bool = False) -> tuple[Status, int, str]:
    outcome = asyncio.run(recoverer.run(once=once, resume=resume))
    return outcome.status, outcome.attempts, outcome.message


def make(actions: Scripted, t: FakeTime, tmp_path: Path, events: list[dict[str, object]]) -> Recoverer:
    s = spec()
    return Recoverer(
        s.node("box"),
        s,
        actions,
        emit=lambda event, **f: events.append({"event": event, **f}),
        store=AttemptStore(tmp_path / "recovery.json"),
        clock=t.clock,
        sleep=t.sleep,
        rng=random.Random(42),
        poll_interval=5,
    )


def test_docker_down_is_restarted_then_containers_then_healthy(tmp_path: Path) -> None:
    t, events = FakeTime(), list[dict[str, object]]()
    actions = Scripted(
        probe=[Obs(ssh=Reach.UP, docker=False, healthy=False)],
        restart_docker=[Obs(ok=True)],
        probe_docker=[Obs(docker=False), Obs(docker=False), Obs(docker=True)],
        restart_containers=[Obs(ok=True, detail="2 step(s) done")],
        recheck=[Obs(healthy=True)],
    )
    status, attempts, message = run(make(actions, t, tmp_path, events))
    assert (status, attempts, message) == (Status.RECOVERED, 1, "node box: recovered (attempt 1)")
    assert actions.calls == ["probe", "restart_docker", *["probe_docker"] * 3, "restart_containers", "recheck"]
    assert t.slept == [5, 5]  # polled Docker every poll_interval
    steps = [e["step"] for e in events if e["event"] == "recovery-observed"]
    assert steps == ["probe", "restart-docker", "wait-docker", "restart-containers", "recheck"]
    assert not (tmp_path / "recovery.json").exists() or AttemptStore(tmp_path / "recovery.json").get("box") is None


def test_asleep_is_woken_and_waited_for(tmp_path: Path) -> None:
    t, events = FakeTime(), list[dict[str, object]]()
    actions = Scripted(
        probe=[Obs(ssh=Reach.DOWN, docker=False, healthy=False)],
        wake=[Obs(ok=True)],
        probe_ssh=[Obs(ssh=Reach.DOWN)] * 3 + [Obs(ssh=Reach.UP)],
        probe_docker=[Obs(docker=True)],
        restart_containers=[Obs(ok=True)],
        recheck=[Obs(healthy=True)],
    )
    assert run(make(actions, t, tmp_path, events))[0] is Status.RECOVERED
    assert actions.calls[:2] == ["probe", "wake"] and actions.calls.count("probe_ssh") == 4


def test_a_wake_on_purpose_starts_at_wake_without_probing_then_restarts_the_containers(tmp_path: Path) -> None:
    """`homelab wake` (and a node homelab put to sleep): recovery's machine from WAKE, the same steps after."""
    t, events = FakeTime(), list[dict[str, object]]()
    actions = Scripted(
        probe=[Obs(ssh=Reach.UP, docker=True, healthy=True)],  # never asked
        wake=[Obs(ok=True)],
        probe_ssh=[Obs(ssh=Reach.DOWN), Obs(ssh=Reach.UP)],
        probe_docker=[Obs(docker=True)],
        restart_containers=[Obs(ok=True)],
        recheck=[Obs(healthy=True)],
    )
    outcome = asyncio.run(make(actions, t, tmp_path, events).run(start=Step.WAKE))
    assert outcome.status is Status.RECOVERED
    assert actions.calls == ["wake", "probe_ssh", "probe_ssh", "probe_docker", "restart_containers", "recheck"]
    steps = [e["step"] for e in events if e["event"] == "recovery-observed"]
    assert steps == ["wake", "wait-ssh", "wait-docker", "restart-containers", "recheck"]


def test_a_node_homelab_put_to_sleep_is_never_due_for_recovery(tmp_path: Path) -> None:
    store = AttemptStore(tmp_path / "recovery.json")
    chosen, waiting = due_nodes(spec(), ["box"], store, 0.0, asleep=["box"])
    assert chosen == [] and waiting == []
    chosen, _ = due_nodes(spec(), ["box"], store, 0.0)
    assert [n.name for n in chosen] == ["box"]


def test_wait_for_ssh_runs_out_then_backoff_then_give_up_limit(tmp_path: Path) -> None:
    t, events = FakeTime(), list[dict[str, object]]()
    actions = Scripted(
        probe=[Obs(ssh=Reach.DOWN, docker=False, healthy=False)],
        wake=[Obs(ok=True)],
        probe_ssh=[Obs(ssh=Reach.DOWN, detail="connection refused")],
    )
    status, attempts, message = run(make(actions, t, tmp_path, events))
    assert (status, attempts) == (Status.FAILED, 3)
    assert message.endswith("marked failed, will retry in 10 min")
    assert "no SSH within 60 s (connection refused)" in message
    # two backoffs between the three attempts: 10 s and 30 s, ± 20 %, from the seeded RNG
    rng = random.Random(42)
    b = spec().recovery.backoff
    expected = [backoff_delay(1, b, rng), backoff_delay(2, b, rng)]
    backoffs = [s for s in t.slept if s != 5]
    assert backoffs == expected and 8 <= expected[0] <= 12 and 24 <= expected[1] <= 36
    record = AttemptStore(tmp_path / "recovery.json").get("box")
    assert record is not None and record.status is Status.FAILED and record.attempts == 3
    assert record.next_retry == pytest.approx(t.now + 600)
    assert [e["attempt"] for e in events if e["event"] == "recovery-retry"] == [1, 2]
    node = spec().node("box")
    assert due(record, node, t.now)[0] is False and "will retry in 10 min" in due(record, node, t.now)[1]
    assert due(record, node, t.now + 601) == (True, "")


def test_watch_loop_continues_backoff_across_runs(tmp_path: Path) -> None:
    t, events = FakeTime(), list[dict[str, object]]()
    actions = Scripted(
        probe=[Obs(ssh=Reach.UP, docker=False, healthy=False)], restart_docker=[Obs(ok=False, detail="exit 1")]
    )
    status, attempts, message = run(make(actions, t, tmp_path, events), once=True, resume=True)
    assert (
        (status, attempts) == (Status.BACKOFF, 1) and "attempt 1 of 3 failed" in message and "will retry in" in message
    )
    assert t.slept == []  # once: the backoff is recorded, not slept
    status, attempts, _ = run(make(actions, t, tmp_path, events), once=True, resume=True)
    assert (status, attempts) == (Status.BACKOFF, 2)
    status, attempts, _ = run(make(actions, t, tmp_path, events), once=True, resume=True)
    assert (status, attempts) == (Status.FAILED, 3)


def test_untrusted_host_key_gives_up_without_waking(tmp_path: Path) -> None:
    t, events = FakeTime(), list[dict[str, object]]()
    actions = Scripted(probe=[Obs(ssh=Reach.REJECTED, docker=False, healthy=False, detail="host key not trusted")])
    status, attempts, message = run(make(actions, t, tmp_path, events))
    assert (status, attempts) == (Status.GAVE_UP, 1)
    assert message == "node box: recovery stopped: host key not trusted; giving up until the spec or the node changes"
    assert actions.calls == ["probe"] and t.slept == []
    record = AttemptStore(tmp_path / "recovery.json").get("box")
    assert record is not None and not due(record, spec().node("box"), t.now + 10**6)[0]
    changed = spec().node("box").model_copy(update={"address": "192.0.2.11"})
    assert node_hash(changed) != record.spec_hash and due(record, changed, t.now)[0]


def test_healthy_node_is_left_alone(tmp_path: Path) -> None:
    t, events = FakeTime(), list[dict[str, object]]()
    actions = Scripted(probe=[Obs(ssh=Reach.UP, docker=True, healthy=True)])
    assert run(make(actions, t, tmp_path, events))[:2] == (Status.HEALTHY, 1)


def test_secret_values_are_masked_in_events(tmp_path: Path) -> None:
    t, events = FakeTime(), list[dict[str, object]]()
    actions = Scripted(
        probe=[Obs(ssh=Reach.UP, docker=False, healthy=False)],
        restart_docker=[Obs(ok=False, detail="sudo: wrong password hunter2")],
    )
    r = make(actions, t, tmp_path, events)
    r.redact = Redactor(["hunter2"])
    _, _, message = run(r)
    assert "hunter2" not in repr(events) and "hunter2" not in message and MASK in message


# ------------------------------------------------------------------ secrets


def test_secret_providers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HL_TEST_SECRET", "s3cret-env")
    assert resolve("env:HL_TEST_SECRET").reveal() == "s3cret-env"
    f = tmp_path / "pw"
    f.write_text("s3cret-file\n")
    f.chmod(0o644)
    with pytest.raises(SecretError) as exc:
        resolve("secret:sudo", {"sudo": f"file:{f}"})
    assert str(exc.value) == (
        f"secret:sudo (file:{f}): {f} is readable by others (mode 0644); refusing it: chmod 600 {f}"
    )
    f.chmod(0o600)
    secret = resolve("secret:sudo", {"sudo": f"file:{f}"})
    assert secret.reveal() == "s3cret-file" and str(secret) == MASK and "s3cret" not in repr(secret)
    assert resolve(f"cmd:cat {f}").reveal() == "s3cret-file"
    with pytest.raises(SecretError) as exc:
        resolve("cmd:echo s3cret-leak; exit 4", what="node box: ssh.sudo_password")
    assert str(exc.value) == "node box: ssh.sudo_password: the secret command failed (exit 4)"
    with pytest.raises(SecretError, match=r"^secret:nope: not an entry of `secrets` \(known: sudo\)$"):
        resolve("secret:nope", {"sudo": "env:X"})
    with pytest.raises(SecretError, match=r"^env:HL_NOT_SET_ANYWHERE: environment variable HL_NOT_SET_ANYWHERE"):
        resolve("env:HL_NOT_SET_ANYWHERE")


def test_redactor_masks_longest_first() -> None:
    redact = Redactor(["abc", "abcdef"])
    assert redact("x abcdef y abc") == f"x {MASK} y {MASK}"


# ------------------------------------------------------------------ wake-on-LAN


def test_magic_packet_reaches_a_loopback_listener() -> None:
    assert magic_packet("aa:bb:cc:dd:ee:ff") == b"\xff" * 6 + bytes.fromhex("aabbccddeeff") * 16
    assert is_broadcast("255.255.255.255") and is_broadcast("192.168.1.255") and not is_broadcast("127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(5)
        send_magic_packet("AA-BB-CC-DD-EE-FF", "127.0.0.1", listener.getsockname()[1])
        data, _ = listener.recvfrom(1024)
    assert data == magic_packet("aa:bb:cc:dd:ee:ff") and len(data) == 102


def test_decision_is_a_value() -> None:
    assert transition(Step.RECHECK, Obs(healthy=True), CAN) == Decision(Step.DONE, "every endpoint of the node answers")
