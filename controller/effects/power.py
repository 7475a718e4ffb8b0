"""Nodes that sleep when idle and wake when asked (a node's `power` section).

    AWAKE ──idle ≥ sleep_after, nothing in flight (watch)──▶ sleep command over SSH ──▶ ASLEEP
    ASLEEP ──`homelab wake NODE`──▶ recovery's machine from WAKE (wait SSH, Docker, containers) ──▶ AWAKE
    ASLEEP ──a request through the gateway (its plugin sends the wake)──▶ the node answers again; the watch's
              next sweep runs recovery's machine from PROBE (containers one at a time, health-gated) ──▶ AWAKE

Last use. Each sweep asks every model server of a sleep-enabled node what it served: llama-server `GET /slots`
(a swap pool's router: its members' states on `GET /v1/models` and each loaded member's `/slots?model=ALIAS`)
(each slot's `id_task` changes when the slot takes a new request, `is_processing` is true while one is in
flight) and Ollama `GET /api/ps` (each loaded model's `expires_at` moves forward with every request it serves).
A signature of those values that changed since the last sweep, or a request in flight, is a use. Why these and
not the alternatives: they come from the servers that do the work, so requests that bypass the gateway count
too; `/slots` is on by default in llama-server (its `/metrics` needs `--metrics`, which homelab does not
pass), and LiteLLM's own per-deployment figures need its database or enterprise Prometheus. What it misses:
an Ollama request still in flight longer than `sleep_after` (Ollama shows no in-flight state; its expiry moves
when the request ends). A server that does not answer is never "idle": a node that is DOWN belongs to
recovery, not to sleep.

State. STATE_DIR/power.json holds the nodes homelab put to sleep ({node: {state, since, reason}}; a node that
is not there is awake), written atomically, and the same file next to the gateway's config
(`homelab_power.json`, mode process or external) for the gateway's plugin (`controller.core.power_plugin`).
Recovery never recovers a node that is there; `homelab health` and `homelab status` show it ASLEEP.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from controller.core.power_plugin import POWER_STATE
from controller.core.state import ClusterState
from controller.drivers.base import CommandFailed, DriverError, SshFailed
from controller.drivers.llamacpp import LOADED, LOADING, parse_router_models
from controller.drivers.secrets import Redactor
from controller.effects.engine import Wiring
from controller.effects.recovery import EventFn, NodeActions, Outcome, Reach, Recoverer, Status, Step, in_words
from controller.effects.statefile import TIME, read_json
from specs.files import atomic_write
from specs.model import ClusterSpec, Node

STATE_FILE = "power.json"
POWER_SHAPE: dict[str, Any] = {"*": {"state": str, "since": TIME, "reason": str, "pid": int, "host": str}}
"""power.json as its readers need it (`statefile.check`)."""
SLEEP_COMMAND_TIMEOUT_S = 60.0
ASLEEP = "asleep"
WAKING = "waking"
AWAKE = "awake"
POWER_STATES = (AWAKE, ASLEEP, WAKING)


def gateway_dir(spec: ClusterSpec) -> Path | None:
    """Where the gateway's plugin reads the power state: the config's directory (modes process and external,
    whose config is on this machine); None otherwise."""
    gw = spec.gateway
    if gw is None or gw.mode not in ("process", "external"):
        return None
    return Path(gw.config_path).expanduser().parent


@dataclass
class PowerStore:
    """STATE_DIR/power.json (and its copy for the gateway's plugin): the nodes homelab put to sleep."""

    state_dir: Path
    gateway: Path | None = None

    @classmethod
    def of(cls, spec: ClusterSpec, state_dir: Path) -> PowerStore:
        return cls(state_dir, gateway_dir(spec))

    def load(self) -> dict[str, dict[str, Any]]:
        raw = read_json(self.state_dir / STATE_FILE, POWER_SHAPE)
        if not isinstance(raw, dict):
            return {}
        out = {str(k): v for k, v in raw.items() if isinstance(v, dict) and v.get("state") in (ASLEEP, WAKING)}
        for name, record in out.items():
            if record["state"] == WAKING and _waker_gone(record):
                # `homelab wake` (or a watch) killed mid-wake: asleep as far as anyone knows, so a request or the
                # next `homelab wake` wakes it again (waking forever would keep both away, and recovery too)
                out[name] = {
                    **record,
                    "state": ASLEEP,
                    "reason": f"the wake by process {record.get('pid')} stopped before it finished",
                }
        return out

    def asleep(self) -> set[str]:
        return set(self.load())

    def put(self, node: str, state: str | None, reason: str = "", since: float | None = None) -> None:
        """Record the node asleep or waking (`state`), or awake (None)."""
        records = self.load()
        if state is None:
            records.pop(node, None)
        else:
            old = records.get(node) or {}
            records[node] = {
                "state": state,
                "since": since if since is not None else float(old.get("since") or time.time()),
                "reason": reason,
            }
            if state == WAKING:  # who is waking it: a record whose process is gone is not waking any more
                records[node].update(pid=os.getpid(), host=socket.gethostname())
        text = json.dumps(records, indent=2, sort_keys=True) + "\n"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_dir / STATE_FILE, text, keep_previous=False)
        if self.gateway is not None:
            self.gateway.mkdir(parents=True, exist_ok=True)
            atomic_write(self.gateway / POWER_STATE, text, keep_previous=False)


def _waker_gone(record: dict[str, Any]) -> bool:
    """Whether the process that recorded a wake is known to be gone (on this machine; elsewhere: not known)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def asleep_nodes(spec: ClusterSpec, state_dir: Path) -> set[str]:
    """The nodes of the spec homelab put to sleep (and has not seen awake since)."""
    names = {n.name for n in spec.nodes}
    return PowerStore.of(spec, state_dir).asleep() & names


# --------------------------------------------------------------------------- last use


@dataclass(frozen=True)
class Usage:
    """What a node's model servers served, as of one look."""

    signature: tuple[str, ...]
    in_flight: bool
    error: str | None = None
    """Set when a server did not answer: the node's idleness is unknown."""


async def probe_usage(node: Node, desired: ClusterState | None, timeout: float = 3.0) -> Usage:
    """llama-server `/slots` of each of the node's containers and Ollama `/api/ps`. A swap pool's router answers
    `/slots` with 400 (`model name is missing from the request`): its use is read from its members' states on
    `/v1/models` (a member loading is a request in flight; a change of state is a use) and, for each loaded
    member, its own `/slots?model=ALIAS`."""
    urls: list[tuple[str, str]] = []
    if desired is not None and node.name in desired.nodes:
        for c in desired.nodes[node.name].containers:
            base = c.health_url.removesuffix("/health")
            urls.append(("pool", base) if c.pool else ("slots", base + "/slots"))
    if node.ollama is not None:
        urls.append(("ps", node.ollama.url.rstrip("/") + "/api/ps"))
    signature: list[str] = []
    in_flight = False
    async with httpx.AsyncClient(trust_env=False, timeout=timeout) as client:
        for kind, url in urls:
            try:
                if kind == "pool":
                    busy, seen = await _pool_usage(client, url)
                    in_flight = in_flight or busy
                    signature.extend(seen)
                    continue
                r = await client.get(url)
                r.raise_for_status()
                data = r.json()
            except (httpx.HTTPError, ValueError, DriverError) as exc:
                return Usage((), False, f"{url}: {str(exc) if isinstance(exc, DriverError) else type(exc).__name__}")
            if kind == "slots":
                busy, seen = _slots_usage(url, data)
                in_flight = in_flight or busy
                signature.extend(seen)
            else:
                for m in data.get("models", []) if isinstance(data, dict) else ():
                    if isinstance(m, dict):
                        signature.append(f"{url}#{m.get('name')}={m.get('expires_at')}")
    return Usage(tuple(sorted(signature)), in_flight)


def _slots_usage(url: str, data: Any) -> tuple[bool, list[str]]:
    """(a request in flight, the slots' signature) from a `/slots` answer."""
    busy = False
    seen: list[str] = []
    for s in data if isinstance(data, list) else ():
        if isinstance(s, dict):
            busy = busy or bool(s.get("is_processing"))
            seen.append(f"{url}#{s.get('id')}={s.get('id_task')}")
    return busy, seen


async def _pool_usage(client: httpx.AsyncClient, base: str) -> tuple[bool, list[str]]:
    """A router's use: its members' states on `/v1/models`, and each loaded member's `/slots?model=ALIAS` (a
    member whose slots do not answer counts by its state alone). DriverError when `/v1/models` does not answer
    a router's list."""
    r = await client.get(base + "/v1/models")
    if r.status_code != 200:
        raise DriverError(f"HTTP {r.status_code}")
    members = parse_router_models(r.json())
    busy = any(m.state == LOADING for m in members.values())
    seen = [f"{base}/v1/models#{alias}={m.state}" for alias, m in sorted(members.items())]
    for alias, m in sorted(members.items()):
        if m.state != LOADED:
            continue
        url = f"{base}/slots?model={alias}"
        slots = await client.get(url)
        if slots.status_code == 200:
            try:
                member_busy, member_seen = _slots_usage(url, slots.json())
            except ValueError:
                continue
            busy = busy or member_busy
            seen.extend(member_seen)
    return busy, seen


@dataclass
class IdleTracker:
    """When each node was last used (clock seconds). Pure: usage and the time in, the idle time out."""

    last_use: dict[str, float] = field(default_factory=dict)
    seen: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def update(self, node: str, usage: Usage, now: float) -> float | None:
        """Record a look; the seconds the node has been idle, or None when unknown (a server did not answer)."""
        if usage.error is not None:
            return None
        if node not in self.last_use or usage.in_flight or self.seen.get(node) != usage.signature:
            self.last_use[node] = now
        self.seen[node] = usage.signature
        return now - self.last_use[node]

    def forget(self, node: str) -> None:
        """The node woke: idle time counts from its next look."""
        self.last_use.pop(node, None)
        self.seen.pop(node, None)


def sleep_due(node: Node, idle: float | None, in_flight: bool) -> tuple[bool, str]:
    """Whether to put the node to sleep now, and why (not)."""
    assert node.power is not None
    if idle is None:
        return False, "its model servers do not all answer: idleness unknown"
    if in_flight:
        return False, "a request is in flight"
    if idle < node.power.sleep_after:
        return False, f"idle {in_words(idle)} of {in_words(node.power.sleep_after)}"
    return True, f"idle {in_words(idle)} (sleep_after {in_words(node.power.sleep_after)}), nothing in flight"


def describe_sleep(node: Node) -> str:
    """The plan line of a sleep."""
    assert node.power is not None
    where = f"{node.ssh.user}@{node.address}:{node.ssh.port}" if node.ssh is not None else "this machine"
    sudo = (
        f", sudo password from {node.ssh.sudo_password} on stdin"
        if node.ssh is not None and node.ssh.sudo_password is not None
        else ""
    )
    return f"node {node.name}: sleep: run `{node.power.command_for(node.os)}` on {where}{sudo}"


# --------------------------------------------------------------------------- sleep and wake


SLEEP_GRACE_S = 20.0
"""How long a sleep command whose connection dropped may take to make the node stop answering."""
DROPPED_EXITS = frozenset({-1, 255})
"""Exit statuses of a command whose connection dropped: killed by a signal or its session lost (-1), ssh's own
failure (255). A sleep command that suspends the machine under its own SSH session ends like that."""


async def node_answers(actions: NodeActions) -> str | None:
    """What of the node still answers (its SSH server, its Docker engine), or None when nothing does."""
    node = actions.node
    if node.ssh is not None:
        ssh = await actions.probe_ssh()
        if ssh.ssh is Reach.UP:
            return "its SSH server"
    if node.docker is not None:
        docker = await actions.probe_docker()
        if docker.docker:
            return "its Docker engine"
    return None


async def _stopped_answering(actions: NodeActions, grace: float, every: float) -> str | None:
    """None once the node stops answering within `grace` seconds; else what still answers."""
    deadline = time.monotonic() + grace
    while True:
        answering = await node_answers(actions)
        if answering is None:
            return None
        if time.monotonic() >= deadline:
            return answering
        await asyncio.sleep(every)


async def sleep_node(
    spec: ClusterSpec,
    node: Node,
    state_dir: Path,
    wiring: Wiring,
    *,
    emit: EventFn,
    reason: str,
    redactor: Redactor | None = None,
    actions: NodeActions | None = None,
    grace: float = SLEEP_GRACE_S,
    every: float = 1.0,
) -> tuple[bool, str]:
    """Run the node's sleep command over SSH and record it asleep. (ok, what happened).

    The node is recorded asleep before the command runs, so that recovery and health, which may look while the
    machine goes down under the command, see a sleep homelab ordered, not a DOWN node. A command that ends with
    its connection dropping (exit -1 or 255, an SSH session lost, killed by its timeout) is a success when the
    node then stops answering within `grace` seconds: that is how a suspend over SSH ends. Any other failure
    takes the record back and says why (never an empty reason)."""
    assert node.power is not None
    redact = redactor or Redactor()
    actions = actions or NodeActions(spec, node, state_dir, wiring=wiring, redactor=redact)
    store = PowerStore.of(spec, state_dir)
    command = node.power.command_for(node.os)
    emit("node-sleep", node=node.name, reason=reason, action=describe_sleep(node))
    store.put(node.name, ASLEEP, reason)  # ordered: recovery leaves it alone from now on
    dropped: str | None = None
    failed: str | None = None
    try:
        obs = await actions.run_on_node(command, SLEEP_COMMAND_TIMEOUT_S)
    except (SshFailed, CommandFailed) as exc:
        dropped = redact(str(exc)) or type(exc).__name__
    except DriverError as exc:
        failed = redact(str(exc)) or type(exc).__name__
    else:
        if not obs.ok:
            detail = obs.detail.strip().rstrip(":").strip() or "no output"
            if any(detail.startswith(f"exit {code}") for code in DROPPED_EXITS):
                dropped = f"{detail} (the connection dropped)"
            else:
                failed = detail
    if dropped is not None and failed is None:
        still = await _stopped_answering(actions, grace, every)
        if still is not None:
            failed = f"{dropped}; {still} still answers {in_words(grace)} later"
        else:
            reason = f"{reason}; the sleep command's connection dropped and the node stopped answering"
    if failed is not None:
        store.put(node.name, None)
        emit("node-sleep-failed", node=node.name, error=failed)
        return False, f"node {node.name}: the sleep command failed: {failed}"
    store.put(node.name, ASLEEP, reason)
    emit("node-asleep", node=node.name, reason=reason)
    return True, f"node {node.name}: asleep ({reason})"


async def wake_node(
    spec: ClusterSpec,
    node: Node,
    state_dir: Path,
    wiring: Wiring,
    desired: ClusterState | None,
    *,
    emit: EventFn,
    start: Step = Step.WAKE,
    why: str = "homelab wake",
    redactor: Redactor | None = None,
    clock: Callable[[], float] = time.time,
) -> Outcome:
    """Wake the node (start WAKE: the packet or command, then wait for SSH and Docker; start PROBE: it already
    woke) and bring its containers back one at a time, health-gated — recovery's machine and its actions, with
    its attempts and backoff. On success the node is awake again in the power state."""
    redact = redactor or Redactor()
    store = PowerStore.of(spec, state_dir)
    began = clock()
    store.put(node.name, WAKING, why)
    emit("node-waking", node=node.name, reason=why)
    actions = NodeActions(spec, node, state_dir, wiring=wiring, desired=desired, redactor=redact)
    recoverer = Recoverer(node, spec, actions, emit=emit, store=None, redact=redact)
    try:
        outcome = await recoverer.run(start=start)
    except BaseException as exc:  # (another apply holding the lock, a cancelled watch): asleep until tried again
        store.put(node.name, ASLEEP, f"the wake stopped: {redact(str(exc)) or type(exc).__name__}")
        raise
    if outcome.status in (Status.RECOVERED, Status.HEALTHY):
        store.put(node.name, None)
        emit("node-awake", node=node.name, reason=why, seconds=round(clock() - began, 3))
    else:
        store.put(node.name, ASLEEP, f"the wake did not bring it back: {outcome.message}")
    return outcome
