"""Automatic node recovery: a per-node state machine, bounded retries with backoff, every step an event.

    PROBE ──healthy──────────────────────────────────────────────────────────▶ DONE
      │  ssh up, Docker down ──▶ RESTART_DOCKER ──▶ WAIT_DOCKER ──▶ RESTART_CONTAINERS ──▶ RECHECK ──▶ DONE
      │  ssh up, Docker up ─────────────────────────────────────▶ RESTART_CONTAINERS
      │  ssh down, wake set ──▶ WAKE ──▶ WAIT_SSH ──▶ WAIT_DOCKER      (ssh down, no wake, Docker up: containers)
      │  host key not trusted, key refused, no way to wake or reach it ──▶ GIVE_UP
      └─ any step that fails, any wait that runs out ──▶ RETRY

`transition()` is the whole machine and does no I/O: the step just done and
what was observed in, the next step and why out. `Recoverer` drives it through
an `Actions` object (`NodeActions` does the real I/O: SSH, Docker, the wake
packet or command, the engine's plan for the node, the health probes), with an
injectable clock, sleep and seeded RNG so tests run it in fake time.

Retry policy: an attempt that ends in RETRY is tried again after
`backoff.initial × factor^(n-1)` seconds (capped at `backoff.max`, ± `jitter`);
after `recovery.attempts` attempts the node is marked failed and tried again
`backoff.max` later ("will retry in 10 min"). GIVE_UP is for what waiting does
not fix (an untrusted host key, a key the node refuses, no `wake` and no
`ssh`): "giving up until the spec or the node changes". Attempt counts and the
next retry per node persist in STATE_DIR/recovery.json, so a watch loop keeps
its backoff across runs. A node's failure never stops the others.

Secrets (the sudo password) are resolved when used, passed on stdin, and
masked (`***`) in every event and message.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from controller.core.plan import GATEWAY_STEPS, Plan
from controller.core.state import ClusterState
from controller.drivers.base import CommandFailed, DockerNode, DriverError, HostKeyRejected, SshFailed
from controller.drivers.secrets import Redactor, resolve
from controller.drivers.ssh import is_local, node_shell
from controller.drivers.wake import run_wake_command, send_magic_packet
from controller.effects.apply import LockHeld, LockUnavailable
from controller.effects.engine import Prepared, Session, Wiring
from controller.effects.health import Status as ProbeStatus
from controller.effects.health import endpoints, probe_all
from controller.effects.statefile import TIME, read_json
from specs.files import atomic_write
from specs.model import Backoff, ClusterSpec, Node

STATE_FILE = "recovery.json"
POLL_INTERVAL_S = 2.0


class Reach(StrEnum):
    """How SSH to the node went."""

    UP = "up"
    DOWN = "down"
    REJECTED = "host-key-rejected"
    DENIED = "permission-denied"
    NO_SSH = "no-ssh"


class Step(StrEnum):
    PROBE = "probe"
    RESTART_DOCKER = "restart-docker"
    WAKE = "wake"
    WAIT_SSH = "wait-ssh"
    WAIT_DOCKER = "wait-docker"
    RESTART_CONTAINERS = "restart-containers"
    RECHECK = "recheck"
    DONE = "done"
    RETRY = "retry"
    GIVE_UP = "give-up"


TERMINAL = frozenset({Step.DONE, Step.RETRY, Step.GIVE_UP})


@dataclass(frozen=True)
class Observation:
    """What a step saw: only the fields it looked at are set; `ok` says whether its action worked."""

    ssh: Reach | None = None
    docker: bool | None = None
    healthy: bool | None = None
    ok: bool = True
    detail: str = ""
    ssh_detail: str = ""
    """Why SSH is not UP, when `detail` says more than that (PROBE)."""


@dataclass(frozen=True)
class Decision:
    step: Step
    reason: str


@dataclass(frozen=True)
class Abilities:
    """What the spec lets recovery do for this node."""

    can_wake: bool
    can_shell: bool
    """Commands can run on the node (an `ssh` section, or the node is this machine)."""


def _why(obs: Observation, default: str) -> str:
    return obs.detail or default


def _ssh_why(obs: Observation, default: str) -> str:
    return obs.ssh_detail or obs.detail or default


def transition(done: Step, obs: Observation, can: Abilities) -> Decision:
    """The next step after `done`, given what it observed. Pure."""
    if done is Step.PROBE:
        if obs.healthy:
            return Decision(Step.DONE, "every endpoint of the node answers: nothing to do")
        if obs.ssh is Reach.REJECTED:
            return Decision(Step.GIVE_UP, _ssh_why(obs, "the node's host key is not trusted"))
        if obs.ssh is Reach.DENIED:
            return Decision(Step.GIVE_UP, _ssh_why(obs, "the node refused the SSH key"))
        if obs.ssh is Reach.UP:
            if obs.docker:
                return Decision(Step.RESTART_CONTAINERS, "SSH and Docker answer: restart the node's containers")
            return Decision(Step.RESTART_DOCKER, "SSH answers but Docker does not: restart Docker")
        if obs.ssh is Reach.DOWN and can.can_wake:
            return Decision(Step.WAKE, f"SSH does not answer ({_ssh_why(obs, 'down')}): wake the node")
        if obs.docker:
            return Decision(Step.RESTART_CONTAINERS, "Docker answers: restart the node's containers")
        if obs.ssh is Reach.NO_SSH:
            return Decision(Step.GIVE_UP, "Docker does not answer and the node has no `ssh` section to restart it")
        return Decision(Step.RETRY, f"SSH does not answer ({_ssh_why(obs, 'down')}) and the node has no `wake`")
    if done is Step.RESTART_DOCKER:
        if obs.ok:
            return Decision(Step.WAIT_DOCKER, "Docker restart command done: wait for Docker")
        return Decision(Step.RETRY, f"the Docker restart command failed: {_why(obs, 'no detail')}")
    if done is Step.WAKE:
        if obs.ok:
            return Decision(Step.WAIT_SSH, "wake-up sent: wait for SSH")
        return Decision(Step.RETRY, f"wake-up failed: {_why(obs, 'no detail')}")
    if done is Step.WAIT_SSH:
        if obs.ssh is Reach.UP:
            return Decision(Step.WAIT_DOCKER, "SSH answers: wait for Docker")
        if obs.ssh is Reach.REJECTED:
            return Decision(Step.GIVE_UP, _why(obs, "the node's host key is not trusted"))
        if obs.ssh is Reach.DENIED:
            return Decision(Step.GIVE_UP, _why(obs, "the node refused the SSH key"))
        return Decision(Step.RETRY, f"the node did not wake: {_why(obs, 'SSH does not answer')}")
    if done is Step.WAIT_DOCKER:
        if obs.docker:
            return Decision(Step.RESTART_CONTAINERS, "Docker answers: restart the node's containers")
        return Decision(Step.RETRY, f"Docker did not come back: {_why(obs, 'no answer')}")
    if done is Step.RESTART_CONTAINERS:
        if obs.ok:
            return Decision(Step.RECHECK, "containers restarted: check health again")
        return Decision(Step.RETRY, f"restarting the containers failed: {_why(obs, 'no detail')}")
    if done is Step.RECHECK:
        if obs.healthy:
            return Decision(Step.DONE, "every endpoint of the node answers")
        return Decision(Step.RETRY, f"still unhealthy: {_why(obs, 'an endpoint is down')}")
    raise ValueError(f"{done.value} is a final step")


def backoff_delay(attempt: int, backoff: Backoff, rng: random.Random) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): exponential, capped, with ± jitter."""
    base = min(backoff.max, backoff.initial * backoff.factor ** (attempt - 1))
    spread = base * backoff.jitter
    return max(0.0, min(backoff.max, base + rng.uniform(-spread, spread)))


def in_words(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 < 1:
        return f"{seconds / 60:.0f} min"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


# --------------------------------------------------------------------------- persisted attempts


class Status(StrEnum):
    RECOVERED = "recovered"
    HEALTHY = "healthy"
    BACKOFF = "backoff"
    FAILED = "failed"
    GAVE_UP = "gave-up"


@dataclass(frozen=True)
class NodeRecord:
    status: Status
    attempts: int = 0
    next_retry: float | None = None
    """Wall-clock time (epoch seconds) of the next attempt; None: not before the spec or the node changes."""
    reason: str = ""
    spec_hash: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "attempts": self.attempts,
            "next_retry": self.next_retry,
            "reason": self.reason,
            "spec_hash": self.spec_hash,
        }


def node_hash(node: Node) -> str:
    return hashlib.sha256(node.model_dump_json().encode()).hexdigest()[:16]


RECORDS_SHAPE: dict[str, Any] = {
    "*": {"status": str, "attempts": int, "next_retry": TIME, "reason": str, "spec_hash": str}
}
"""recovery.json as `AttemptStore.load` needs it (`statefile.check`)."""


class AttemptStore:
    """STATE_DIR/recovery.json: per node, its status, attempts and next retry (written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, NodeRecord]:
        raw = read_json(self.path, RECORDS_SHAPE)
        out: dict[str, NodeRecord] = {}
        for name, r in raw.items() if isinstance(raw, dict) else ():
            try:
                out[name] = NodeRecord(
                    Status(r["status"]), int(r["attempts"]), r.get("next_retry"), r.get("reason", ""), r["spec_hash"]
                )
            except (KeyError, ValueError, TypeError):
                continue
        return out

    def get(self, node: str) -> NodeRecord | None:
        return self.load().get(node)

    def put(self, node: str, record: NodeRecord | None) -> None:
        records = self.load()
        if record is None:
            records.pop(node, None)
        else:
            records[node] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({k: v.to_json() for k, v in sorted(records.items())}, indent=2, sort_keys=True) + "\n"
        atomic_write(self.path, text, keep_previous=False)


def due(record: NodeRecord | None, node: Node, now: float) -> tuple[bool, str]:
    """Whether a watch loop should try to recover the node now, and why not."""
    if record is None or record.status in (Status.RECOVERED, Status.HEALTHY):
        return True, ""
    if record.spec_hash != node_hash(node):
        return True, "the node's spec changed"
    if record.status is Status.GAVE_UP:
        return False, f"gave up: {record.reason}; giving up until the spec or the node changes"
    if record.next_retry is not None and now < record.next_retry:
        return False, f"{record.status.value}: will retry in {in_words(record.next_retry - now)}"
    return True, ""


# --------------------------------------------------------------------------- the runner


class Actions(Protocol):
    """The I/O of recovery for one node (`NodeActions`; a scripted fake in tests)."""

    async def probe(self) -> Observation:
        """SSH, Docker and the node's health, all at once."""
        ...

    async def probe_ssh(self) -> Observation: ...

    async def probe_docker(self) -> Observation: ...

    async def restart_docker(self) -> Observation: ...

    async def wake(self) -> Observation: ...

    async def restart_containers(self) -> Observation: ...

    async def recheck(self) -> Observation: ...

    def describe(self, step: Step) -> str:
        """What the step does for this node, in words (for --dry-run and events)."""
        ...


EventFn = Callable[..., None]
"""emit(event, **fields)."""


@dataclass(frozen=True)
class Outcome:
    node: str
    status: Status
    attempts: int
    message: str
    steps: tuple[tuple[str, str], ...] = ()
    """(step, what happened) in order, across attempts."""

    @property
    def ok(self) -> bool:
        return self.status in (Status.RECOVERED, Status.HEALTHY)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "status": self.status.value,
            "attempts": self.attempts,
            "message": self.message,
            "steps": [{"step": s, "detail": d} for s, d in self.steps],
        }


@dataclass
class Recoverer:
    """Drives `transition()` for one node: one attempt, or bounded attempts with backoff."""

    node: Node
    spec: ClusterSpec
    actions: Actions
    emit: EventFn = field(default=lambda event, **fields: None)
    store: AttemptStore | None = None
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)
    poll_interval: float = POLL_INTERVAL_S
    redact: Callable[[str], str] = field(default=lambda text: text)
    _steps: list[tuple[str, str]] = field(default_factory=list)

    @property
    def abilities(self) -> Abilities:
        return Abilities(
            can_wake=self.node.wake is not None, can_shell=self.node.ssh is not None or is_local(self.node)
        )

    def _event(self, event: str, **fields: Any) -> None:
        clean = {k: self.redact(v) if isinstance(v, str) else v for k, v in fields.items()}
        self.emit(event, node=self.node.name, **clean)

    async def _wait(
        self,
        probe: Callable[[], Awaitable[Observation]],
        timeout: float,
        done: Callable[[Observation], bool],
        what: str,
    ) -> Observation:
        deadline = self.clock() + timeout
        while True:
            obs = await probe()
            if done(obs):
                return obs
            if self.clock() >= deadline:
                return replace(obs, ok=False, detail=f"no {what} within {timeout:g} s ({obs.detail or 'down'})")
            await self.sleep(self.poll_interval)

    async def _do(self, step: Step) -> Observation:
        a, r = self.actions, self.spec.recovery
        if step is Step.RESTART_DOCKER:
            return await a.restart_docker()
        if step is Step.WAKE:
            return await a.wake()
        if step is Step.WAIT_SSH:
            return await self._wait(
                a.probe_ssh, r.wait_ssh, lambda o: o.ssh in (Reach.UP, Reach.REJECTED, Reach.DENIED), "SSH"
            )
        if step is Step.WAIT_DOCKER:
            return await self._wait(a.probe_docker, r.wait_docker, lambda o: bool(o.docker), "Docker")
        if step is Step.RESTART_CONTAINERS:
            return await a.restart_containers()
        if step is Step.RECHECK:
            return await a.recheck()
        return await a.probe()

    async def attempt(self, number: int, start: Step = Step.PROBE) -> Decision:
        """One pass through the machine, from `start` (PROBE; WAKE for `homelab wake`) to DONE, RETRY or
        GIVE_UP."""
        step = start
        while True:
            self._event("recovery-step", step=step.value, attempt=number, action=self.actions.describe(step))
            try:
                obs = await self._do(step)
            except DriverError as exc:
                obs = Observation(ok=False, detail=str(exc))
            decision = transition(step, obs, self.abilities)
            detail = self.redact(obs.detail)
            self._steps.append((step.value, detail or ("ok" if obs.ok else "failed")))
            self._event(
                "recovery-observed",
                step=step.value,
                attempt=number,
                ok=obs.ok,
                ssh=obs.ssh.value if obs.ssh else None,
                docker=obs.docker,
                healthy=obs.healthy,
                detail=detail,
                next=decision.step.value,
                reason=decision.reason,
            )
            if decision.step in TERMINAL:
                return Decision(decision.step, self.redact(decision.reason))
            step = decision.step

    def _save(self, record: NodeRecord | None) -> None:
        if self.store is not None:
            self.store.put(self.node.name, record)

    async def run(self, *, once: bool = False, resume: bool = False, start: Step = Step.PROBE) -> Outcome:
        """Attempt until DONE or GIVE_UP, at most `recovery.attempts` times, backing off in between.

        `once`: a single attempt, its backoff only recorded (a watch loop comes back when it is due).
        `resume`: continue the attempt count of the store (a watch loop); else start from 1 (by hand).
        `start`: where the first attempt begins (WAKE: a node homelab put to sleep, woken on purpose); later
        attempts begin at PROBE.
        """
        limit = self.spec.recovery.attempts
        backoff = self.spec.recovery.backoff
        h = node_hash(self.node)
        previous = self.store.get(self.node.name) if self.store is not None and resume else None
        attempts = previous.attempts if previous is not None and previous.status is Status.BACKOFF else 0
        self._steps = []
        self._event("recovery-started", attempt=attempts + 1, limit=limit)
        first = start
        while True:
            attempts += 1
            decision = await self.attempt(attempts, first)
            first = Step.PROBE
            if decision.step is Step.DONE:
                status = Status.HEALTHY if self._steps and len(self._steps) == 1 and attempts == 1 else Status.RECOVERED
                message = (
                    f"node {self.node.name}: healthy, nothing to recover"
                    if status is Status.HEALTHY
                    else f"node {self.node.name}: recovered (attempt {attempts})"
                )
                self._save(None)
                self._event("recovery-finished", status=status.value, attempts=attempts, message=message)
                return Outcome(self.node.name, status, attempts, message, tuple(self._steps))
            if decision.step is Step.GIVE_UP:
                message = (
                    f"node {self.node.name}: recovery stopped: {decision.reason};"
                    " giving up until the spec or the node changes"
                )
                self._save(NodeRecord(Status.GAVE_UP, attempts, None, decision.reason, h))
                self._event("recovery-finished", status=Status.GAVE_UP.value, attempts=attempts, message=message)
                return Outcome(self.node.name, Status.GAVE_UP, attempts, message, tuple(self._steps))
            now = self.clock()
            if attempts >= limit:
                wait = backoff.max
                message = (
                    f"node {self.node.name}: recovery failed after {attempts} attempts ({decision.reason});"
                    f" marked failed, will retry in {in_words(wait)}"
                )
                self._save(NodeRecord(Status.FAILED, attempts, now + wait, decision.reason, h))
                self._event("recovery-finished", status=Status.FAILED.value, attempts=attempts, message=message)
                return Outcome(self.node.name, Status.FAILED, attempts, message, tuple(self._steps))
            delay = backoff_delay(attempts, backoff, self.rng)
            message = (
                f"node {self.node.name}: attempt {attempts} of {limit} failed ({decision.reason});"
                f" will retry in {in_words(delay)}"
            )
            self._save(NodeRecord(Status.BACKOFF, attempts, now + delay, decision.reason, h))
            self._event("recovery-retry", attempt=attempts, delay=round(delay, 3), message=message)
            if once:
                return Outcome(self.node.name, Status.BACKOFF, attempts, message, tuple(self._steps))
            await self.sleep(delay)


def predicted_path(first: Observation, can: Abilities) -> list[Decision]:
    """The steps recovery would take from what PROBE saw, assuming each step then works (for --dry-run)."""
    success = {
        Step.RESTART_DOCKER: Observation(ok=True),
        Step.WAKE: Observation(ok=True),
        Step.WAIT_SSH: Observation(ssh=Reach.UP),
        Step.WAIT_DOCKER: Observation(docker=True),
        Step.RESTART_CONTAINERS: Observation(ok=True),
        Step.RECHECK: Observation(healthy=True),
    }
    path = [transition(Step.PROBE, first, can)]
    while path[-1].step not in TERMINAL:
        path.append(transition(path[-1].step, success[path[-1].step], can))
    return path


# --------------------------------------------------------------------------- the real I/O


ConnectFn = Callable[[Node], DockerNode]


def docker_restart_command(spec: ClusterSpec, node: Node) -> str | None:
    if node.docker is not None and node.docker.restart_command:
        return node.docker.restart_command
    return spec.recovery.docker_restart.get(node.os)


class NodeActions:
    """Recovery's I/O for one node: SSH (host keys checked), Docker, wake-up, the engine, health probes."""

    def __init__(
        self,
        spec: ClusterSpec,
        node: Node,
        state_dir: Path,
        *,
        wiring: Wiring,
        desired: ClusterState | None = None,
        redactor: Redactor | None = None,
        restart_containers_fn: Callable[[], str] | None = None,
    ) -> None:
        self.spec = spec
        self.node = node
        self.state_dir = state_dir
        self.wiring = wiring
        self.connect: ConnectFn = wiring.connect(spec)
        self.desired = desired
        self.redactor = redactor or Redactor()
        self._restart_containers_fn = restart_containers_fn

    # -- probes

    async def probe_ssh(self) -> Observation:
        if self.node.ssh is None and not is_local(self.node):
            return Observation(ssh=Reach.NO_SSH, detail="no `ssh` section")
        try:
            async with node_shell(self.node) as shell:
                timeout = self.node.ssh.connect_timeout if self.node.ssh is not None else 10.0
                await shell.run("true", timeout=timeout)
        except HostKeyRejected as exc:
            return Observation(ssh=Reach.REJECTED, detail=str(exc))
        except SshFailed as exc:
            if "permission denied" in str(exc):
                return Observation(ssh=Reach.DENIED, detail=str(exc))
            return Observation(ssh=Reach.DOWN, detail=str(exc))
        except CommandFailed as exc:
            return Observation(ssh=Reach.DOWN, detail=str(exc))
        return Observation(ssh=Reach.UP)

    async def probe_docker(self) -> Observation:
        if self.node.docker is None:
            return Observation(docker=True, detail="no `docker` section")

        def ping() -> None:
            driver = self.connect(self.node)
            try:
                driver.ping()
            finally:
                close = getattr(driver, "close", None)
                if close is not None:
                    close()

        try:
            await asyncio.to_thread(ping)
        except DriverError as exc:
            return Observation(docker=False, detail=str(exc))
        return Observation(docker=True)

    async def _health(self) -> Observation:
        eps = [e for e in endpoints(self.spec, self.desired) if e.node == self.node.name and e.tier != "gateway"]
        probes = await probe_all(eps, self.spec.health.slow_threshold)
        down = [p for p in probes if p.status is ProbeStatus.DOWN]
        detail = "; ".join(f"{p.endpoint.name}: {p.error or 'down'}" for p in down)
        return Observation(healthy=not down, detail=detail)

    async def probe(self) -> Observation:
        ssh, docker, health = await asyncio.gather(self.probe_ssh(), self.probe_docker(), self._health())
        detail = "; ".join(d for d in (ssh.detail if ssh.ssh is not Reach.UP else "", health.detail) if d)
        return Observation(
            ssh=ssh.ssh, docker=docker.docker, healthy=health.healthy, detail=detail, ssh_detail=ssh.detail
        )

    async def recheck(self) -> Observation:
        return await self._health()

    # -- actions

    def _secret_stdin(self, ref: str | None, what: str) -> bytes | None:
        """A secret as a command's standard input (a line), masked from then on; None without one."""
        if ref is None:
            return None
        secret = resolve(ref, self.spec.secrets, what=f"node {self.node.name}: {what}")
        self.redactor.add(secret)
        return secret.reveal().encode() + b"\n"

    def _sudo_stdin(self) -> bytes | None:
        ssh = self.node.ssh
        return self._secret_stdin(ssh.sudo_password if ssh is not None else None, "ssh.sudo_password")

    async def run_on_node(self, command: str, timeout: float) -> Observation:
        """Run `command` on the node (SSH, or here for this machine), the sudo password on its stdin."""
        stdin = self._sudo_stdin()
        async with node_shell(self.node) as shell:
            result = await shell.run(command, stdin=stdin, timeout=timeout)
        if result.exit_status != 0:
            return Observation(ok=False, detail=self.redactor(f"exit {result.exit_status}: {result.error_line}"))
        return Observation(ok=True)

    async def restart_docker(self) -> Observation:
        command = docker_restart_command(self.spec, self.node)
        if command is None:
            return Observation(ok=False, detail=f"no Docker restart command for os {self.node.os.value}")
        return await self.run_on_node(command, self.spec.recovery.wait_docker)

    async def wake(self) -> Observation:
        wake = self.node.wake
        if wake is None:
            return Observation(ok=False, detail="no `wake` section")
        if wake.wol is not None:
            send_magic_packet(wake.wol.mac, wake.wol.broadcast, wake.wol.port)
            return Observation(
                ok=True, detail=f"magic packet for {wake.wol.mac} sent to {wake.wol.broadcast}:{wake.wol.port}"
            )
        assert wake.command is not None
        stdin = self._secret_stdin(wake.stdin, "wake.stdin")
        result = await run_wake_command(self.node.name, wake.command, stdin=stdin)
        if result.exit_status != 0:
            return Observation(
                ok=False, detail=self.redactor(f"wake command: exit {result.exit_status}: {result.error_line}")
            )
        return Observation(ok=True, detail="wake command done")

    async def restart_containers(self) -> Observation:
        fn = self._restart_containers_fn or self._restart_with_engine
        try:
            detail = await asyncio.to_thread(fn)
        except (DriverError, LockHeld, LockUnavailable) as exc:  # another apply holds the lock: a step failed, retried
            return Observation(ok=False, detail=self.redactor(str(exc)))
        return Observation(ok=True, detail=detail)

    def _node_plan(self, session: Session) -> tuple[Prepared, Plan]:
        """This node's steps of the engine's plan (in its safe order), placed exactly as `homelab reconcile`
        places (the same wiring and solver settings)."""
        prepared = session.prepare(gateway=False)
        if self.node.name in prepared.plan.unreachable:
            raise DriverError(f"node {self.node.name}: {prepared.plan.unreachable[self.node.name]}")
        mine = tuple(s for s in prepared.plan.steps if s.node == self.node.name and s.kind not in GATEWAY_STEPS)
        return prepared, replace(prepared.plan, steps=mine)

    def planned_steps(self) -> list[str]:
        """What restarting this node's containers would do now (a dry run: nothing is changed)."""
        with Session(self.spec, self.wiring, self.state_dir) as session:
            return [s.describe() for s in self._node_plan(session)[1].steps]

    def _restart_with_engine(self) -> str:
        with Session(self.spec, self.wiring, self.state_dir) as session:
            prepared, plan = self._node_plan(session)
            if not plan.steps:
                return "nothing to restart: the node's containers match the spec"
            result = session.executor(prepared, nodes={self.node.name}).apply(plan)
            if not result.ok:
                raise DriverError(result.summary().replace("\n", "; "))
            return f"{len(plan.steps)} step(s) done: " + ", ".join(s.describe() for s in plan.steps)

    def describe(self, step: Step) -> str:
        node, r = self.node, self.spec.recovery
        where = f"{node.ssh.user}@{node.address}:{node.ssh.port}" if node.ssh is not None else "this machine"
        if step is Step.PROBE:
            return f"check SSH ({where}), Docker and the node's endpoints"
        if step is Step.RESTART_DOCKER:
            command = docker_restart_command(self.spec, node) or "(none configured)"
            sudo = (
                f", sudo password from {node.ssh.sudo_password} on stdin"
                if node.ssh is not None and node.ssh.sudo_password is not None
                else ""
            )
            return f"run `{command}` on {where}{sudo}"
        if step is Step.WAKE:
            if node.wake is not None and node.wake.wol is not None:
                w = node.wake.wol
                return f"send a Wake-on-LAN packet for {w.mac} to {w.broadcast}:{w.port}"
            if node.wake is not None and node.wake.command is not None:
                fed = f", {node.wake.stdin} on its stdin" if node.wake.stdin is not None else ""
                return f"run the wake command `{node.wake.command}` here{fed}"
            return "no `wake` configured"
        if step is Step.WAIT_SSH:
            return f"wait up to {r.wait_ssh:g} s for SSH on {where}"
        if step is Step.WAIT_DOCKER:
            endpoint = node.docker.endpoint if node.docker is not None else "(no docker)"
            return f"wait up to {r.wait_docker:g} s for Docker at {endpoint}"
        if step is Step.RESTART_CONTAINERS:
            return "restart the node's managed containers in the plan's safe order (one at a time, health-gated)"
        if step is Step.RECHECK:
            return "check the node's endpoints again"
        return step.value


# --------------------------------------------------------------------------- which nodes, and all at once


def due_nodes(
    spec: ClusterSpec, down: Iterable[str], store: AttemptStore, now: float, asleep: Iterable[str] = ()
) -> tuple[list[Node], list[str]]:
    """Of the DOWN nodes, those whose recovery is due now (spec order), and why the others wait. A node that is
    no longer DOWN has its failure count forgotten. A node homelab put to sleep (`asleep`) is never recovered:
    only demand or `homelab wake` wakes it."""
    down = set(down) - set(asleep)
    records = store.load()
    chosen: list[Node] = []
    waiting: list[str] = []
    for node in spec.nodes:
        if node.name not in down:
            if node.name in records:
                store.put(node.name, None)  # it came back: its failure count no longer applies
            continue
        if not spec.recovery.enabled:
            waiting.append(f"node {node.name}: DOWN; recovery is disabled (recovery.enabled: false)")
            continue
        ok, why = due(records.get(node.name), node, now)
        if ok:
            chosen.append(node)
        else:
            waiting.append(f"node {node.name}: DOWN; {why}")
    return chosen, waiting


def node_actions(
    spec: ClusterSpec, node: Node, state_dir: Path, wiring: Wiring, desired: ClusterState | None, redactor: Redactor
) -> NodeActions:
    return NodeActions(spec, node, state_dir, wiring=wiring, desired=desired, redactor=redactor)


async def run_all(
    spec: ClusterSpec,
    chosen: Iterable[Node],
    state_dir: Path,
    wiring: Wiring,
    desired: ClusterState | None,
    *,
    store: AttemptStore,
    emit: EventFn,
    redactor: Redactor | None = None,
    by_hand: bool = False,
) -> list[Outcome]:
    """Recover the nodes concurrently: by hand, every step from the start; otherwise (cron, watch) one attempt
    each with the stored backoff. One node's failure never stops the others."""
    redact = redactor or Redactor()

    async def one(node: Node) -> Outcome:
        actions = node_actions(spec, node, state_dir, wiring, desired, redact)
        recoverer = Recoverer(node, spec, actions, emit=emit, store=store, redact=redact)
        try:
            return await recoverer.run(once=not by_hand, resume=not by_hand)
        except Exception as exc:  # one node's failure never stops the others
            message = redact(f"node {node.name}: recovery failed: {exc or type(exc).__name__}")
            return Outcome(node.name, Status.FAILED, 0, message)

    return list(await asyncio.gather(*(one(n) for n in chosen)))
