"""Watch mode: a level-based loop that keeps the cluster matching the spec.

Every trigger runs the whole reconcile (observe → place → diff → plan → apply);
no trigger's payload is ever acted on. The triggers:

    start-up          the first reconcile (and health sweep)
    spec changed      the spec file was saved (watchfiles on the file's directory, so an editor's
                      save-rename-write counts; settled for SETTLE_S so it is one change)
    new commit        git mode: a fetch found a new commit on the branch, fast-forwarded to it
    interval          `--interval` (default `watch.interval`): drift detection, health, recovery

`decide()` is the scheduler and does no I/O: the time and what happened so far
in, what to do next (reconcile, fetch, or sleep until when) out. `WatchLoop`
runs it with an injectable clock and wait, so its timing is tested in fake time;
the work itself (`Worker`, sync and thread-based like the executor) runs through
`asyncio.to_thread`.

A spec that does not load (syntax, validation) or whose placement leaves a
model out is reported, located, and not applied: the loop goes on with the last
good spec. A node with an endpoint DOWN after a sweep is handed to recovery
(`controller.effects.recovery`, when its backoff is due) in the background while the
other nodes keep being reconciled. The status (STATE_DIR/watch.json, written
atomically), the event log and Prometheus metrics say what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from watchfiles import awatch

from controller.core.plan import GATEWAY_STEPS, Plan, render_text
from controller.core.state import ClusterState
from controller.drivers.secrets import Redactor
from controller.effects.apply import EVENTS_FILE, EventLog, Executor, LockHeld
from controller.effects.engine import Prepared, Session, Wiring, state_dir
from controller.effects.health import Status, mark_asleep
from controller.effects.power import (
    POWER_STATES,
    IdleTracker,
    PowerStore,
    describe_sleep,
    probe_usage,
    sleep_due,
    sleep_node,
    wake_node,
)
from controller.effects.recovery import STATE_FILE, AttemptStore, Outcome, Step, due_nodes, run_all
from controller.effects.statefile import NUMBER, TIME, read_json
from controller.effects.status_http import StatusFn, StatusServer
from solver.problem import Unplaced
from specs import Diagnostic, LoadedSpec, SpecError, load_spec
from specs.errors import HomelabError
from specs.files import atomic_write
from specs.model import ClusterSpec
from specs.validate import command_keys

STATUS_FILE = "watch.json"
WAKING_STATE = "waking"
SETTLE_S = 0.2
"""A change is acted on once the file has been quiet this long (editors write in several steps)."""

# --------------------------------------------------------------------------- the scheduler (pure)


class Action(StrEnum):
    RECONCILE = "reconcile"
    FETCH = "fetch"
    SLEEP = "sleep"


@dataclass(frozen=True)
class LoopState:
    """What the loop has done so far, in clock seconds."""

    last_run: float | None = None
    """When the last reconcile finished (None: not yet: start-up)."""
    last_fetch: float | None = None
    """Git mode: when the last fetch finished."""
    changed_at: float | None = None
    """The latest change not yet reconciled (a save, a new commit); None: none."""
    change_reason: str = ""


@dataclass(frozen=True)
class Next:
    action: Action
    reason: str
    at: float
    """When: now for work, the wake-up time for SLEEP."""


def decide(now: float, state: LoopState, *, interval: float, git: bool = False, settle: float = SETTLE_S) -> Next:
    """The next thing to do. A change waits `settle` after its latest event; the interval runs from the end of
    the last reconcile (a slow apply never queues runs back to back); git mode fetches every interval."""
    deadlines: list[float] = []
    if state.changed_at is not None:
        ready = state.changed_at + settle
        if now >= ready:
            return Next(Action.RECONCILE, state.change_reason or "spec changed", now)
        return Next(Action.SLEEP, "", ready)  # the run after the settle covers whatever else is due
    elif state.last_run is None:
        return Next(Action.RECONCILE, "start-up", now)
    if git:
        fetch_at = now if state.last_fetch is None else state.last_fetch + interval
        if now >= fetch_at:
            return Next(Action.FETCH, "interval", now)
        deadlines.append(fetch_at)
    if state.last_run is not None:
        due = state.last_run + interval
        if now >= due:
            return Next(Action.RECONCILE, "interval", now)
        deadlines.append(due)
    return Next(Action.SLEEP, "", min(deadlines))


# --------------------------------------------------------------------------- spec sources


class SourceError(HomelabError):
    """The spec's source cannot give a spec now (a git failure, a force-push); the loop keeps the last good one."""


class Source(Protocol):
    @property
    def spec_path(self) -> Path: ...

    @property
    def revision(self) -> str | None:
        """The commit the spec file is at (git mode), else None."""
        ...

    def fetch(self) -> str | None:
        """Git mode: fetch and fast-forward; the new commit, or None when nothing is new."""
        ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class FileSource:
    path: Path

    @property
    def spec_path(self) -> Path:
        return self.path

    @property
    def revision(self) -> str | None:
        return None

    def fetch(self) -> str | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"mode": "file", "path": str(self.path)}


GIT_TIMEOUT_S = 120.0


def git(args: Sequence[str], cwd: Path | None = None, timeout: float = GIT_TIMEOUT_S) -> str:
    """Run `git ARGS` (no shell, no prompts); its stdout, or SourceError with its stderr."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise SourceError("git is not installed") from None
    except subprocess.TimeoutExpired:
        raise SourceError(f"git {args[0]} did not finish within {timeout:g} s") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise SourceError(redact_url(f"git {args[0]} failed: {why[-1] if why else f'exit {done.returncode}'}"))
    return done.stdout.strip()


_USER_PASSWORD_RE = re.compile(r"\b(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):[^@/\s]*@")
_HTTP_TOKEN_RE = re.compile(r"\b(?P<head>https?://)[^/\s:@]+@")


def redact_url(text: str) -> str:
    """A repository URL (or any text holding one, such as git's error) without its credential:
    `https://user:token@host/repo` → `https://user:***@host/repo`, `https://token@host/repo` → `https://***@host/repo`
    (an ssh user name, `ssh://git@host`, is no secret and stays). What `--git` is given is shown, stored in
    watch.json and served only through this."""
    return _HTTP_TOKEN_RE.sub(r"\g<head>***@", _USER_PASSWORD_RE.sub(r"\g<head>:***@", text))


@dataclass
class GitSource:
    """A local clone of REPO_URL's BRANCH in the state directory; the spec is PATH in it.

    `fetch()` fetches the branch and fast-forwards (`git merge --ff-only`); anything else — a force-push, a
    divergence, local changes in the clone — is a SourceError and the clone stays where it was."""

    url: str
    branch: str
    path: str
    workdir: Path
    head: str = ""

    def open(self) -> None:
        if (self.workdir / ".git").is_dir():
            if git(["remote", "get-url", "origin"], self.workdir) != self.url:
                raise SourceError(f"{self.workdir} is a clone of another repository; move it away")
            self.head = git(["rev-parse", "HEAD"], self.workdir)
            return
        self.workdir.parent.mkdir(parents=True, exist_ok=True)
        git(["clone", "--quiet", "--branch", self.branch, "--single-branch", "--", self.url, str(self.workdir)])
        self.head = git(["rev-parse", "HEAD"], self.workdir)

    @property
    def spec_path(self) -> Path:
        return self.workdir / self.path

    @property
    def shown_url(self) -> str:
        """The URL as it may be printed or stored: without its credential (`redact_url`)."""
        return redact_url(self.url)

    @property
    def revision(self) -> str | None:
        return self.head or None

    def fetch(self) -> str | None:
        ref = f"refs/remotes/origin/{self.branch}"
        git(["fetch", "--quiet", "--force", "origin", f"+refs/heads/{self.branch}:{ref}"], self.workdir)
        remote = git(["rev-parse", ref], self.workdir)
        if remote == self.head:
            return None
        try:
            git(["merge", "--ff-only", "--quiet", ref], self.workdir)
        except SourceError as exc:
            raise SourceError(
                f"{self.branch} is at {remote[:12]}, which does not follow the applied {self.head[:12]}"
                f" (force-push or divergence: not applied; fix the branch): {exc}"
            ) from None
        self.head = git(["rev-parse", "HEAD"], self.workdir)
        return self.head

    def describe(self) -> dict[str, Any]:
        return {
            "mode": "git",
            "url": self.shown_url,
            "branch": self.branch,
            "path": self.path,
            "clone": str(self.workdir),
        }


def clone_dir(state_dir: Path, url: str, branch: str) -> Path:
    return state_dir / "git" / hashlib.sha256(f"{url}#{branch}".encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- metrics


class Metrics:
    """The watch's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.endpoint_up = Gauge(
            "homelab_endpoint_up",
            "1 when the endpoint answers (up, slow or starting)",
            ["endpoint", "tier", "kind"],
            registry=r,
        )
        self.endpoint_latency = Gauge(
            "homelab_endpoint_latency_seconds",
            "time to the endpoint's answer",
            ["endpoint", "tier", "kind"],
            registry=r,
        )
        self.tier_state = Gauge("homelab_tier_state", "1 for the tier's verdict", ["tier", "state"], registry=r)
        self.reconciles = Counter("homelab_reconcile", "reconciles run", ["trigger"], registry=r)
        self.failures = Counter("homelab_reconcile_failures", "reconciles that failed", registry=r)
        self.deferred = Counter(
            "homelab_reconcile_deferred",
            "reconciles put off to the next interval, not failed: another apply held the lock (a recovery, a"
            " `homelab reconcile`), or the cluster changed between the plan and the apply (a stale plan)",
            registry=r,
        )
        self.duration = Histogram(
            "homelab_reconcile_duration_seconds",
            "time of one reconcile (observe, place, plan, apply)",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.planned_vram = Gauge(
            "homelab_planned_vram_bytes", "VRAM the placement uses per GPU", ["node", "gpu"], registry=r
        )
        self.gpu_capacity = Gauge(
            "homelab_gpu_capacity_bytes", "VRAM the placement may use per GPU", ["node", "gpu"], registry=r
        )
        self.recovery_attempts = Counter("homelab_recovery_attempts", "recovery attempts started", ["node"], registry=r)
        self.spec_valid = Gauge("homelab_spec_valid", "1 when the latest spec loaded and placed", registry=r)
        self.last_success = Gauge(
            "homelab_last_successful_reconcile_timestamp_seconds", "when a reconcile last succeeded", registry=r
        )
        self.gpu_used = Gauge(
            "homelab_gpu_used_bytes", "VRAM in use per GPU as nvidia-smi reports it (all processes)", ["node", "gpu"],
            registry=r,
        )  # fmt: skip
        self.power_state = Gauge(
            "homelab_node_power_state",
            "1 for the node's power state (awake, asleep, waking); nodes with a `power` section",
            ["node", "state"],
            registry=r,
        )
        self._server: StatusServer | None = None

    def serve(self, port: int, host: str = "127.0.0.1", status: StatusFn | None = None) -> int:
        """/metrics, and with `status` the status page at / and /api/status (`controller.effects.status_http`)."""
        self._server = StatusServer(status, self.registry)
        return self._server.serve(port, host)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


# --------------------------------------------------------------------------- the work of one run


Print = Callable[[str, bool], None]
"""say(line, is_error)."""


def trigger_kind(reason: str) -> str:
    """The metric label of a run's reason: start-up, interval, spec-changed or new-commit."""
    return "new-commit" if reason.startswith("new commit") else reason.replace(" ", "-")


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Good:
    loaded: LoadedSpec
    spec_hash: str
    revision: str | None


@dataclass
class Worker:
    """One run of the loop, sync (called through `asyncio.to_thread`): load the spec (keeping the last good one),
    reconcile through a `Session` with `wiring` (closed at the end of every run), and remember what happened for
    the status file and the metrics."""

    source: Source
    state_dir_override: Path | None
    dry_run: bool
    metrics: Metrics
    say: Print
    wiring: Wiring = field(default_factory=Wiring)
    allow_spec_commands: bool = False
    """Git mode: accept a spec with keys that run commands or choose files homelab writes
    (`specs.validate.command_keys`). Off by default there: whoever can push to the repository would otherwise run
    commands on this machine, or overwrite its files."""
    good: Good | None = None
    bad_hash: str | None = None
    spec_errors: list[str] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    applied: dict[str, Any] = field(default_factory=dict)
    desired: ClusterState | None = None
    stirring: list[str] = field(default_factory=list)
    """Nodes homelab put to sleep on which something answers again (woken by a request), as of the last sweep."""
    _cancel: threading.Event = field(default_factory=threading.Event)
    _executor: Executor | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- the spec

    def refresh_spec(self) -> Good | None:
        """Load the spec if it changed; report a bad one once; the good spec to use (None: none yet)."""
        path = self.source.spec_path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            text = f"\0unreadable {exc}"
        h = _hash(text)
        if self.good is not None and h == self.good.spec_hash:
            self.good.revision = self.source.revision  # a commit that leaves the spec as it was
            if self.bad_hash is not None:  # back to the good spec after a bad one
                self.bad_hash, self.spec_errors = None, []
                self.metrics.spec_valid.set(1)
            return self.good
        if h == self.bad_hash:
            return self.good
        try:
            loaded = load_spec(path)
        except SpecError as exc:
            self._reject(h, list(exc.diagnostics))
            return self.good
        refused = self._refused_commands(loaded)
        if refused:
            self._reject(h, refused)
            return self.good
        for w in loaded.warnings:
            self.say(str(w), True)
        candidate = Good(loaded, h, self.source.revision)
        if self.good is None or candidate.spec_hash != self.good.spec_hash:
            return candidate  # checked for placement by `run`, adopted when it places
        return self.good

    def _refused_commands(self, loaded: LoadedSpec) -> list[Diagnostic]:
        if not isinstance(self.source, GitSource) or self.allow_spec_commands:
            return []
        doc = loaded.document
        out = []
        for path, what in command_keys(loaded.spec):
            line, col, _ = doc.locate(list(path), at_key=True)
            why = (
                f"{what}; a spec from git may not run commands or choose files to write"
                " (homelab watch --allow-spec-commands allows it)"
            )
            out.append(Diagnostic(doc.display_name, line, col, path, why))
        return out

    def _reject(self, h: str, diagnostics: Sequence[Diagnostic | str]) -> None:
        self.bad_hash = h
        self.spec_errors = [str(d) for d in diagnostics]
        self.metrics.spec_valid.set(0)
        where = self.source.revision
        keep = "keeping the last good spec" if self.good is not None else "nothing applied yet"
        self.say(f"spec rejected{f' at commit {where[:12]}' if where else ''} ({keep}):", True)
        for line in self.spec_errors:
            self.say(f"  {line}", True)

    # ---- a run

    def cancel(self) -> None:
        """Stop after the step in progress (SIGTERM)."""
        self._cancel.set()
        with self._lock:
            if self._executor is not None:
                self._executor.cancel()

    def run(self, reason: str) -> dict[str, Any]:
        started = time.time()
        t0 = time.perf_counter()
        result: dict[str, Any] = {"time": started, "trigger": reason, "ok": False}
        self.metrics.reconciles.labels(trigger=trigger_kind(reason)).inc()
        session: Session | None = None
        try:
            for _ in range(2):  # a new spec that does not place is rejected; then the last good one runs
                chosen = self.refresh_spec()
                if chosen is None:
                    result["error"] = "no valid spec yet"
                    return self._finish(result, t0)
                spec = chosen.loaded.spec
                if session is not None:
                    session.close()  # a spec that did not place: its connections go before the last good one runs
                session = Session(spec, self.wiring, self.state_dir(spec))
                prepared = session.prepare()
                if chosen is self.good:
                    break
                if prepared.placement.unplaced and _all_observed(prepared.observed):
                    # (with a node unobserved, what is missing says nothing about the spec: as `reconcile`)
                    self._reject(chosen.spec_hash, _unplaced_diagnostics(chosen.loaded, prepared.placement.unplaced))
                    result["rejected"] = list(self.spec_errors)
                    if self.good is None:
                        result["error"] = "spec rejected: the placement leaves models out"
                        return self._finish(result, t0)
                    continue
                self.good, self.bad_hash, self.spec_errors = chosen, None, []
                self.metrics.spec_valid.set(1)
                at = f" at commit {chosen.revision[:12]}" if chosen.revision else ""
                self.say(f"spec accepted: {chosen.spec_hash}{at}", False)
                break
            else:  # pragma: no cover - the second pass runs the last good spec
                raise AssertionError("no spec to run")
            self._placement_metrics(prepared)
            if not self.dry_run:  # what the running containers hold, for the next plan (the plan itself writes nothing)
                session.record(prepared)
            plan = self._without_sleepers(spec, prepared.plan)
            result["plan"] = {
                "summary": plan.to_json().get("summary"),
                "steps": len(plan.steps),
                "text": render_text(plan),
            }
            result["spec_hash"] = chosen.spec_hash
            result["commit"] = chosen.revision
            self.desired = prepared.desired
            if plan.empty or self.dry_run:
                if not plan.empty or reason != "interval":
                    self.say(render_text(plan).rstrip("\n"), False)
                result["ok"] = True
                result["applied"] = False
                if not self.dry_run:
                    self._applied(chosen)
                return self._finish(result, t0)
            self.say(f"applying ({reason}):\n" + render_text(plan).rstrip("\n"), False)
            executor = session.executor(prepared, on_event=self._event)
            with self._lock:
                if self._cancel.is_set():
                    result["error"] = "stopped before applying"
                    return self._finish(result, t0)
                self._executor = executor
            try:
                outcome = executor.apply(plan)
            finally:
                with self._lock:
                    self._executor = None
            result["applied"] = True
            result["ok"] = outcome.ok
            if outcome.ok:
                self._applied(chosen)
                self.say(f"applied: {len(plan.steps)} steps", False)
            else:
                result["error"] = outcome.summary()
                self.say(("stopped:\n" if self._cancel.is_set() else "apply failed:\n") + outcome.summary(), True)
        except LockHeld as exc:  # StalePlan too: nothing failed, the next interval plans again from what is there
            result["error"] = f"{exc}; will retry at the next interval"
            result["deferred"] = True
            self.say(result["error"], False)
        except (HomelabError, OSError) as exc:  # a node, a rendering, the gateway config: reported, retried
            result["error"] = f"{exc}; will retry at the next interval"
            self.say(f"reconcile failed: {result['error']}", True)
        finally:
            if session is not None:
                session.close()
        return self._finish(result, t0)

    def state_dir(self, spec: ClusterSpec | None) -> Path:
        return state_dir(spec, self.state_dir_override)

    def _without_sleepers(self, spec: ClusterSpec, plan: Plan) -> Plan:
        """The plan less the steps of nodes homelab put to sleep (or is waking): whoever wakes a node brings its
        containers back (recovery's machine, one at a time); a reconcile that started them too would race it."""
        asleep = PowerStore.of(spec, self.state_dir(spec)).asleep()
        held = sorted({s.node for s in plan.steps if s.node in asleep and s.kind not in GATEWAY_STEPS})
        if not held:
            return plan
        for name in held:
            self.say(f"node {name}: asleep (homelab put it to sleep): its steps wait until it is awake", False)
        kept = tuple(s for s in plan.steps if s.node not in held or s.kind in GATEWAY_STEPS)
        return replace(plan, steps=kept)

    def _applied(self, chosen: Good) -> None:
        self.applied = {"spec_hash": chosen.spec_hash, "commit": chosen.revision, "time": time.time()}
        self.metrics.last_success.set(time.time())

    def _event(self, record: dict[str, Any]) -> None:
        event = record["event"]
        if event == "step-started":
            self.say(f"{record['node']}: {record['step']} {record['name']} ...", False)
        elif event == "step-failed":
            self.say(f"{record['node']}: {record['step']} {record['name']} FAILED: {record['error']}", True)

    def _placement_metrics(self, prepared: Prepared) -> None:
        self.metrics.planned_vram.clear()
        self.metrics.gpu_capacity.clear()
        for g in prepared.placement.gpus:
            self.metrics.planned_vram.labels(node=g.node, gpu=str(g.index)).set(g.used_bytes)
            self.metrics.gpu_capacity.labels(node=g.node, gpu=str(g.index)).set(g.capacity_bytes)
        self.metrics.gpu_used.clear()
        reality = prepared.gpus
        for f in reality.findings if reality is not None else ():
            if f.found is not None and f.found.used_bytes is not None:
                self.metrics.gpu_used.labels(node=f.node, gpu=str(f.index)).set(f.found.used_bytes)
        for node in prepared.observed.nodes:  # every node has a series from the start, 0 until recovered
            self.metrics.recovery_attempts.labels(node=node)

    def _finish(self, result: dict[str, Any], t0: float) -> dict[str, Any]:
        result["duration_s"] = round(time.perf_counter() - t0, 3)
        self.metrics.duration.observe(result["duration_s"])
        if result.get("deferred"):
            self.metrics.deferred.inc()
        elif not result["ok"]:
            self.metrics.failures.inc()
        self.last = result
        return result

    # ---- health and recovery

    def sweep(self) -> list[str]:
        """Probe every endpoint of the good spec; the nodes with an endpoint DOWN."""
        if self.good is None:
            return []
        spec = self.good.loaded.spec
        records = PowerStore.of(spec, self.state_dir(spec)).load()
        report = mark_asleep(self.wiring.health(spec, self.desired), records)
        # something answers on a node homelab put to sleep: a request woke it (one being woken by `homelab wake`
        # or by this loop is "waking": whoever wakes it brings its containers back)
        self.stirring = sorted(
            {
                p.endpoint.node
                for p in report.probes
                if p.endpoint.node is not None
                and (records.get(p.endpoint.node) or {}).get("state") == "asleep"
                and p.endpoint.tier != "gateway"
                and p.status not in (Status.DOWN, Status.ASLEEP)
            }
        )
        m = self.metrics
        m.endpoint_up.clear()
        m.endpoint_latency.clear()
        m.tier_state.clear()
        nodes: dict[str, str] = {}
        rank = {Status.UP: 0, Status.IDLE: 0, Status.SLOW: 1, Status.STARTING: 2, Status.ASLEEP: 3, Status.DOWN: 4}
        for p in report.probes:
            e = p.endpoint
            labels = {"endpoint": e.name, "tier": e.tier, "kind": e.kind}
            m.endpoint_up.labels(**labels).set(0 if p.status is Status.DOWN else 1)
            if p.latency is not None:
                m.endpoint_latency.labels(**labels).set(p.latency)
            if e.node is not None and e.tier != "gateway":
                worst = nodes.get(e.node)
                if worst is None or rank[p.status] > rank[Status(worst)]:
                    nodes[e.node] = p.status.value
        for t in report.tiers:
            for v in ("HEALTHY", "DEGRADED", "DOWN", "ASLEEP"):
                m.tier_state.labels(tier=t.tier, state=v).set(1 if t.verdict.value == v else 0)
        self.health = {
            "time": time.time(),
            "verdict": report.verdict.value,
            "reason": report.reason,
            "tiers": {t.tier: t.verdict.value for t in report.tiers},
            "nodes": nodes,
        }
        return sorted(n for n, s in nodes.items() if s == Status.DOWN.value)


def _all_observed(observed: ClusterState) -> bool:
    return all(n.reachable and (n.ollama is None or n.ollama.reachable) for n in observed.nodes.values())


def _unplaced_diagnostics(loaded: LoadedSpec, unplaced: Sequence[Unplaced]) -> list[str]:
    doc = loaded.document
    index = {m.name: i for i, m in enumerate(loaded.spec.models)}
    lines = []
    for u in unplaced:
        i = index.get(u.model)
        if i is None:
            lines.append(f"{doc.display_name}: {u.reason}")
            continue
        line, col, _ = doc.locate(["models", i, "name"], at_key=True)
        lines.append(f"{doc.display_name}:{line}:{col}: models[{i}]: cannot be placed: {u.reason}")
    return lines


def _emitter(log: EventLog) -> Callable[..., None]:
    def emit(event: str, **fields: Any) -> None:
        log.emit(event, **fields)

    return emit


Recover = Callable[[ClusterSpec, Sequence[str], Path, ClusterState | None], Awaitable[list[Outcome]]]
"""recover(spec, nodes, state_dir, desired): one attempt each for these DOWN nodes, with the stored backoff."""


def recover_with(wiring: Wiring) -> Recover:
    """Recovery as `homelab recover` runs it (without node names), through `wiring`, events into the log."""

    async def recover(
        spec: ClusterSpec, nodes: Sequence[str], sdir: Path, desired: ClusterState | None
    ) -> list[Outcome]:
        log = EventLog(sdir / EVENTS_FILE)
        try:
            store = AttemptStore(sdir / STATE_FILE)
            chosen = [spec.node(n) for n in nodes]

            def emit(event: str, **fields: Any) -> None:
                log.emit(event, **fields)

            return await run_all(spec, chosen, sdir, wiring, desired, store=store, emit=emit, redactor=Redactor())
        finally:
            log.close()

    return recover


# --------------------------------------------------------------------------- the loop


Clock = Callable[[], float]
Wait = Callable[[asyncio.Event, float], Awaitable[None]]
"""wait(wake, seconds): return when `wake` is set or `seconds` have passed."""


async def real_wait(wake: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout=max(0.0, seconds))


@dataclass
class WatchLoop:
    worker: Worker
    interval: Callable[[], float]
    git: bool = False
    clock: Clock = time.monotonic
    wall: Clock = time.time
    wait: Wait = real_wait
    settle: float = SETTLE_S
    write_status: bool = True
    state: LoopState = field(default_factory=LoopState)
    runs: int = 0
    fetch_error: str | None = None
    recovering: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    recover: Recover | None = None
    """How DOWN nodes are recovered (None: `recover_with(worker.wiring)`)."""
    idle: IdleTracker = field(default_factory=IdleTracker)
    power: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per sleep-enabled node: its power state, idle seconds, why it is (not) asleep (for watch.json)."""
    waking: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False

    def changed(self, reason: str = "spec changed") -> None:
        """A trigger: the file changed (or a commit arrived). Wakes the loop; settles before acting."""
        self.state = LoopState(self.state.last_run, self.state.last_fetch, self.clock(), reason)
        self._wake.set()

    def stop(self) -> None:
        """SIGTERM/SIGINT: let the step in progress finish, then leave."""
        self._stopping = True
        self.worker.cancel()
        self._wake.set()

    async def run(self, max_runs: int | None = None) -> None:
        try:
            while not self._stopping:
                nxt = decide(self.clock(), self.state, interval=self.interval(), git=self.git, settle=self.settle)
                if nxt.action is Action.SLEEP:
                    self._write_status(next_run=nxt.at)
                    self._wake.clear()
                    await self.wait(self._wake, nxt.at - self.clock())
                    continue
                if nxt.action is Action.FETCH:
                    await self._fetch()
                    continue
                await self._reconcile(nxt.reason)
                if max_runs is not None and self.runs >= max_runs:
                    break
        finally:
            await self._stop_recoveries()
            self._write_status(next_run=None)

    async def _fetch(self) -> None:
        try:
            commit = await asyncio.to_thread(self.worker.source.fetch)
        except SourceError as exc:
            if str(exc) != self.fetch_error:
                self.worker.say(f"git: {exc}", True)
            self.fetch_error = str(exc)
            commit = None
        else:
            self.fetch_error = None
        s = self.state
        self.state = LoopState(s.last_run, self.clock(), s.changed_at, s.change_reason)
        if commit is not None:
            self.worker.say(f"git: new commit {commit[:12]}", False)
            self.changed(f"new commit {commit[:12]}")

    async def _reconcile(self, reason: str) -> None:
        started = self.clock()
        self.state = LoopState(self.state.last_run, self.state.last_fetch)  # this run covers changes so far
        await asyncio.to_thread(self.worker.run, reason)
        self.runs += 1
        if reason in ("start-up", "interval") and not self._stopping and self.worker.good is not None:
            down = await asyncio.to_thread(self.worker.sweep)
            await self._power(down)
            self._recover(down)
        s = self.state
        pending = s.changed_at is not None and s.changed_at >= started  # a save during the run: run again
        self.state = LoopState(
            self.clock(), s.last_fetch, s.changed_at if pending else None, s.change_reason if pending else ""
        )
        self._write_status(next_run=None)

    def _recover(self, down: Sequence[str]) -> None:
        good = self.worker.good
        if good is None or not down:
            return
        spec = good.loaded.spec
        sdir = self.worker.state_dir(spec)
        store = AttemptStore(sdir / STATE_FILE)
        asleep = PowerStore.of(spec, sdir).asleep()
        due, waiting = due_nodes(spec, down, store, self.wall(), asleep)
        chosen = [n.name for n in due if n.name not in self.recovering]
        waiting = [w for w in waiting if not any(w.startswith(f"node {n}: ") for n in self.recovering)]
        for line in waiting:
            self.worker.say(line, True)
        if self.worker.dry_run:
            for n in chosen:
                self.worker.say(f"node {n}: DOWN; would start recovery (dry run)", True)
            return
        for name in chosen:
            self.worker.say(f"node {name}: DOWN; starting recovery", True)
            self.worker.metrics.recovery_attempts.labels(node=name).inc()
            self.recovering[name] = asyncio.create_task(self._recover_one(spec, name, sdir))

    async def _recover_one(self, spec: ClusterSpec, name: str, sdir: Path) -> None:
        try:
            recover = self.recover or recover_with(self.worker.wiring)
            outcomes = await recover(spec, [name], sdir, self.worker.desired)
            for o in outcomes:
                self.worker.say(o.message, not o.ok)
        except Exception as exc:  # a node's recovery never stops the loop
            self.worker.say(f"node {name}: recovery failed: {exc}", True)
        finally:
            self.recovering.pop(name, None)

    async def _power(self, down: Sequence[str]) -> None:
        """Sleep-enabled nodes: resume those a request woke, put idle ones to sleep, record the states."""
        good = self.worker.good
        if good is None:
            return
        spec = good.loaded.spec
        sleepers = [n for n in spec.nodes if n.power is not None]
        if not sleepers and not self.worker.stirring:
            self.power.clear()
            return
        sdir = self.worker.state_dir(spec)
        asleep = PowerStore.of(spec, sdir).load()
        for name in self.worker.stirring:  # woken by a request: its containers come back as in recovery
            still = (asleep.get(name) or {}).get("state") == "asleep"  # not being woken by `homelab wake` since
            if still and name not in self.waking and name not in self.recovering and not self.worker.dry_run:
                self.worker.say(f"node {name}: asleep, but answering again (woken by a request): resuming", False)
                self.waking[name] = asyncio.create_task(self._resume(spec, name, sdir))
        now = self.clock()
        m = self.worker.metrics
        for node in sleepers:
            entry: dict[str, Any] = {"sleep_after": node.power.sleep_after if node.power else None}
            record = asleep.get(node.name)
            if record is not None or node.name in self.waking:
                state = WAKING_STATE if node.name in self.waking else str(record.get("state") if record else "")
                entry.update(state=state, since=(record or {}).get("since"), reason=(record or {}).get("reason"))
                self.idle.forget(node.name)
            elif node.name in down or node.name in self.recovering:
                entry.update(state="awake", reason="DOWN: recovery's, not asleep")
                self.idle.forget(node.name)
            else:
                usage = await probe_usage(node, self.worker.desired)
                idle = self.idle.update(node.name, usage, now)
                ok, why = sleep_due(node, idle, usage.in_flight)
                entry.update(state="awake", idle_s=None if idle is None else round(idle, 1), reason=why)
                if ok:
                    self.worker.say(describe_sleep(node) + f" ({why})", False)
                    if self.worker.dry_run:
                        entry["reason"] = f"would sleep (dry run): {why}"
                    else:
                        log = EventLog(sdir / EVENTS_FILE)
                        try:
                            done, message = await sleep_node(
                                spec, node, sdir, self.worker.wiring, emit=_emitter(log), reason=why
                            )
                        finally:
                            log.close()
                        self.worker.say(message, not done)
                        if done:
                            entry.update(state="asleep", since=self.wall(), reason=why)
                            self.idle.forget(node.name)
            self.power[node.name] = entry
            for v in POWER_STATES:
                m.power_state.labels(node=node.name, state=v).set(1 if entry.get("state") == v else 0)
        for gone in set(self.power) - {n.name for n in sleepers}:
            self.power.pop(gone, None)

    async def _resume(self, spec: ClusterSpec, name: str, sdir: Path) -> None:
        log = EventLog(sdir / EVENTS_FILE)
        try:
            outcome = await wake_node(
                spec, spec.node(name), sdir, self.worker.wiring, self.worker.desired,
                emit=_emitter(log), start=Step.PROBE, why="woken by a request",
            )  # fmt: skip
            self.worker.say(outcome.message, not outcome.ok)
        except Exception as exc:  # a node's wake never stops the loop
            self.worker.say(f"node {name}: resuming failed: {exc}", True)
        finally:
            log.close()
            self.waking.pop(name, None)

    async def _stop_recoveries(self) -> None:
        tasks = [*self.recovering.values(), *self.waking.values()]
        self.waking.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.recovering.clear()

    def status(self, next_run: float | None) -> dict[str, Any]:
        w = self.worker
        in_secs = None if next_run is None else max(0.0, next_run - self.clock())
        return {
            "pid": os.getpid(),
            "source": w.source.describe(),
            "dry_run": w.dry_run,
            "applied": w.applied,
            "head": w.source.revision,
            "spec_errors": w.spec_errors,
            "fetch_error": self.fetch_error,
            "last_run": w.last,
            "runs": self.runs,
            "health": w.health,
            "recovering": sorted(self.recovering),
            "power": self.power,
            "asleep": sorted(n for n, e in self.power.items() if e.get("state") == "asleep"),
            "next_run": None if in_secs is None else self.wall() + in_secs,
            "updated": self.wall(),
        }

    def _write_status(self, next_run: float | None) -> None:
        if not self.write_status:
            return
        w = self.worker
        sdir = w.state_dir(w.good.loaded.spec if w.good is not None else None)
        with contextlib.suppress(OSError):
            sdir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.status(next_run), indent=2, sort_keys=True, default=str) + "\n"
            atomic_write(sdir / STATUS_FILE, text, keep_previous=False, mode=0o600)


async def watch_file(loop: WatchLoop, path: Path, stop: asyncio.Event) -> None:
    """Trigger on every save of `path` (the directory is watched: editors replace files)."""
    path = path.absolute()
    name = path.name

    def wanted(_change: Any, changed: str) -> bool:
        return Path(changed).name == name

    async for _changes in awatch(
        path.parent, watch_filter=wanted, debounce=1000, step=50, stop_event=stop, recursive=False
    ):
        loop.changed("spec changed")


@contextlib.contextmanager
def signals(loop: WatchLoop) -> Iterator[None]:
    import signal

    aio = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        aio.add_signal_handler(sig, loop.stop)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            aio.remove_signal_handler(sig)


async def serve(loop: WatchLoop, *, watch_path: Path | None, handle_signals: bool = False) -> None:
    """Run the loop (and, in file mode, the file watcher) until `loop.stop()`."""
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_file(loop, watch_path, stop)) if watch_path is not None else None
    try:
        with signals(loop) if handle_signals else contextlib.nullcontext():
            await loop.run()
    finally:
        stop.set()
        if watcher is not None:
            try:
                await asyncio.wait_for(watcher, timeout=5)
            except TimeoutError:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher


STATUS_SHAPE: dict[str, Any] = {
    "pid": int,
    "source": {"*": str},
    "applied": {"spec_hash": str, "commit": str, "time": TIME},
    "head": str,
    "spec_errors": [str],
    "fetch_error": str,
    "last_run": {"time": TIME, "trigger": str, "plan": {"summary": object, "steps": int, "text": str}},
    "runs": int,
    "health": {"time": TIME, "verdict": str, "reason": str, "tiers": {"*": str}, "nodes": {"*": str}},
    "recovering": [str],
    "power": {"*": {"state": str, "since": TIME, "idle_s": NUMBER, "reason": str, "sleep_after": NUMBER}},
    "asleep": [str],
    "next_run": TIME,
    "updated": TIME,
}
"""What the readers of watch.json rely on (`statefile.check`); other keys are shown as they are."""


def read_status(state_dir: Path) -> dict[str, Any] | None:
    """STATE_DIR/watch.json, checked (a bad one is reported and set aside: read as absent)."""
    data = read_json(state_dir / STATUS_FILE, {**STATUS_SHAPE, "*": object})
    return data if isinstance(data, dict) else None


def describe_watch(status: dict[str, Any]) -> list[str]:
    """The watch status file in a few lines, for `homelab status`."""
    src = status.get("source") or {}
    url = redact_url(str(src.get("url")))  # a watch.json written before URLs were redacted
    where = f"{url} ({src.get('branch')}) {src.get('path')}" if src.get("mode") == "git" else src.get("path")
    applied = status.get("applied") or {}
    what = applied.get("commit") or applied.get("spec_hash")
    lines = [f"watch (pid {status.get('pid')}{', dry run' if status.get('dry_run') else ''}): {where}"]
    shown = f"commit {what[:12]}" if applied.get("commit") and what else (what or "nothing yet")
    lines.append(f"  applied: {shown}")
    last = status.get("last_run") or {}
    if last:
        when = time.strftime("%H:%M:%S", time.localtime(last.get("time", 0)))
        summary = (last.get("plan") or {}).get("summary")
        result = "ok" if last.get("ok") else f"FAILED: {last.get('error')}"
        lines.append(f"  last run: {when} ({last.get('trigger')}), plan {summary}, {result}")
    for line in status.get("spec_errors") or []:
        lines.append(f"  spec rejected: {line}")
    if status.get("fetch_error"):
        lines.append(f"  git: {status['fetch_error']}")
    health = status.get("health") or {}
    if health:
        nodes = ", ".join(f"{n} {s}" for n, s in sorted((health.get("nodes") or {}).items()))
        lines.append(f"  health: {health.get('verdict')} ({nodes})")
    if status.get("next_run"):
        lines.append(f"  next run: {time.strftime('%H:%M:%S', time.localtime(status['next_run']))}")
    return lines
