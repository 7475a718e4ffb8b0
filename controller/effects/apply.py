"""Run a plan step by step, record every step as an event, stop at the first failure.

Nodes run in parallel (one thread each); a node's steps run in order. When a
step fails, every node stops after its current step, and the result says what
was done and what was not. One apply at a time: a lock file in the state
directory keeps a second one out. Only the drivers touch the world, and they
refuse objects without homelab labels.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from controller.core.plan import Plan, Step, StepKind
from controller.core.state import LABEL_CLUSTER, LABEL_NODE
from controller.drivers.base import DockerNode, DriverError, Gateway, OllamaNode, ProgressFn
from controller.drivers.llamacpp import identity
from controller.drivers.poll import poll_200
from specs.errors import HomelabError

EVENTS_FILE = "events.jsonl"
LOCK_FILE = "apply.lock"


class LockHeld(HomelabError):
    """Another apply holds the lock."""


class LockUnavailable(HomelabError):
    """A lock file cannot be opened (its directory is missing or not writable): blamed on that directory."""


class StalePlan(LockHeld):
    """The cluster is no longer what the plan was made from (found once the apply lock was held)."""


class StepFailed(DriverError):
    pass


HealthCheck = Callable[[str, float, Callable[[], bool], tuple[str, ...]], None]
"""health_check(url, timeout, cancelled, serves): return once `url` answers 200 and the server there lists every
name of `serves` on `/v1/models` (it is the container just started); raise StepFailed otherwise."""


def wait_healthy(url: str, timeout: float, cancelled: Callable[[], bool], serves: tuple[str, ...] = ()) -> None:
    """Poll llama-server's /health until 200 (503 means loading; anything else, keep trying until timeout), then
    prove the answering server is the container just started: its `/v1/models` lists `serves` (its `--alias`, a
    router's members). A server that squats the port fails the wait at once, naming what answered."""

    def stop_if_cancelled() -> None:
        if cancelled():
            raise StepFailed("cancelled")

    stop_if_cancelled()
    last = poll_200(
        url,
        timeout,
        every=0.1,
        describe=lambda code: "loading (503)" if code == 503 else f"HTTP {code}",
        between=stop_if_cancelled,
    )
    if last is not None:
        raise StepFailed(f"{url} did not answer 200 within {timeout:g}s (last: {last})")
    if serves:
        wrong = identity(url.removesuffix("/health"), serves, min(timeout, 5.0))
        if wrong is not None:
            raise StepFailed(f"not the container just started: {wrong}")


@dataclass
class NodeOutcome:
    node: str
    done: list[Step] = field(default_factory=list)
    failed: Step | None = None
    error: str | None = None
    not_run: list[Step] = field(default_factory=list)


@dataclass
class ApplyResult:
    outcomes: dict[str, NodeOutcome]

    @property
    def ok(self) -> bool:
        return all(o.failed is None and not o.not_run for o in self.outcomes.values())

    def summary(self) -> str:
        lines = []
        for node, o in sorted(self.outcomes.items()):
            if o.failed is not None:
                lines.append(f"node {node}: FAILED at {o.failed.describe()}: {o.error}")
            lines.append(f"node {node}: {len(o.done)} step(s) done, {len(o.not_run)} not run")
            for s in o.not_run:
                lines.append(f"  not run: {s.describe()}")
        return "\n".join(lines)


class EventLog:
    """Events as JSON lines in the state directory, one line per write (appended, flushed)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._fh: TextIO = path.open("a", encoding="utf-8")

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": time.time(), "event": event, **fields}
        line = json.dumps(record, sort_keys=True, default=str)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()
        return record

    def close(self) -> None:
        self._fh.close()


@contextmanager
def apply_lock(state_dir: Path, cluster: str | None = None) -> Iterator[None]:
    """One writer: an exclusive, non-blocking lock on STATE_DIR/apply.lock and, with `cluster`, on this machine's
    lock for that cluster (`cluster_lock_path`), so two state directories — the service's and a shell user's —
    cannot apply to one cluster at once."""
    state_dir.mkdir(parents=True, exist_ok=True)
    held = "another homelab apply is running (pid {holder}); lock file {path}"
    with _in_process(state_dir), _flock(state_dir / LOCK_FILE, held, "state directory"):
        if cluster is None:
            yield
            return
        held = "another homelab apply to cluster '" + cluster + "' is running (pid {holder}); lock file {path}"
        where = f"lock directory (${LOCK_DIR_ENV})" if os.environ.get(LOCK_DIR_ENV) else "lock directory"
        with _flock(cluster_lock_path(cluster), held, where):
            yield


_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


@contextmanager
def _in_process(state_dir: Path) -> Iterator[None]:
    """Applies of one process to one state directory take turns (the watch's reconcile and its own recovery run
    in threads of one process: the second waits for the first instead of failing on its own pid's file lock)."""
    key = str(state_dir.resolve())
    with _PROCESS_LOCKS_GUARD:
        lock = _PROCESS_LOCKS.setdefault(key, threading.Lock())
    if not lock.acquire(blocking=False):  # this thread may hold it already: then the file lock says so
        if any(t is threading.current_thread() for t in _OWNERS.get(key, ())):
            yield
            return
        lock.acquire()
    _OWNERS.setdefault(key, []).append(threading.current_thread())
    try:
        yield
    finally:
        _OWNERS[key].remove(threading.current_thread())
        lock.release()


_OWNERS: dict[str, list[threading.Thread]] = {}


LOCK_DIR_ENV = "HOMELAB_LOCK_DIR"
"""Where this machine's per-cluster locks live when set (default /run/lock, else /tmp): a test run (or
a second, separate lab on one machine) sets its own so that it never waits on another's clusters."""


def cluster_lock_path(cluster: str) -> Path:
    """This machine's lock for a cluster, the same for every user and state directory: /run/lock (else /tmp)."""
    env = os.environ.get(LOCK_DIR_ENV)
    base = Path("/run/lock") if os.access("/run/lock", os.W_OK) else Path("/tmp")
    if env:
        base = Path(env)
    return base / f"homelab-{hashlib.sha256(cluster.encode()).hexdigest()[:16]}.lock"


class LockUnsafe(HomelabError):
    """A lock file homelab will not use: a symbolic link, not a regular file, or another user's."""


_NOFOLLOW = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
HOLDER_MAX = 32
"""The most characters of a lock holder's text (its pid, or whatever another user wrote there) an error shows."""


def _holder(raw: bytes) -> str:
    """The pid written in a lock file, or what is there instead, escaped and cut: never a terminal's escape
    sequence or a forged line in the error."""
    text = raw.decode(errors="replace").strip()
    if text.isascii() and text.isdigit() and len(text) <= 10:
        return text
    if not text:
        return "unknown"
    return "unknown: " + ascii(text[:HOLDER_MAX])


def _open_lock(path: Path, where: str) -> int:
    """Open (creating it if need be) the lock file without following a symlink and without truncating it;
    refuse one that is not a regular file or is owned by another user than us or root."""
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        except PermissionError:  # another user's (root's) lock file: locking needs no write access
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError as exc:
        if os.path.islink(path):
            raise LockUnsafe(f"lock file {path} is a symbolic link; not followed (remove it)") from None
        reason = exc.strerror or str(exc)
        raise LockUnavailable(f"{where} {path.parent}: cannot open the lock file {path.name}: {reason}") from None
    st = os.fstat(fd)
    why = None
    if not stat.S_ISREG(st.st_mode):
        why = "is not a regular file"
    elif st.st_uid not in (os.geteuid(), 0):
        why = f"belongs to another user (uid {st.st_uid}); not used (remove it)"
    if why is not None:
        os.close(fd)
        raise LockUnsafe(f"lock file {path} {why}")
    return fd


@contextmanager
def _flock(path: Path, message: str, where: str) -> Iterator[None]:
    """`where` names the directory the lock file lives in, for the error when it cannot be opened."""
    fd = _open_lock(path, where)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 64, 0))
            raise LockHeld(message.format(holder=holder, path=path)) from None
        try:
            os.ftruncate(fd, 0)  # only now that the lock is ours
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # opened read-only: the lock holds all the same, only the pid is not written
        yield
    finally:
        os.close(fd)


class Executor:
    """Applies plans through per-node drivers."""

    def __init__(
        self,
        cluster: str,
        drivers: Mapping[str, DockerNode],
        state_dir: Path,
        *,
        health_timeout: Mapping[str, float] | None = None,
        health_check: HealthCheck = wait_healthy,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_progress: Callable[[str, str, int, int], None] | None = None,
        ollama: Mapping[str, OllamaNode] | None = None,
        gateway: Gateway | None = None,
        gateway_timeout: float = 120.0,
        recheck: Callable[[], str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.ollama = dict(ollama or {})
        self.gateway = gateway
        self.gateway_timeout = gateway_timeout
        self.recheck = recheck
        """The cluster's observed fingerprint now: checked once the locks are held, so a plan made before another
        apply changed the cluster is never run."""
        self.drivers = drivers
        self.state_dir = state_dir
        self.health_timeout = dict(health_timeout or {})
        self.health_check = health_check
        self.on_event = on_event
        self.on_progress = on_progress
        self._stop = threading.Event()

    def cancel(self) -> None:
        """Stop after the step in progress on each node (SIGTERM): the rest is reported as not run."""
        self._stop.set()

    def apply(self, plan: Plan) -> ApplyResult:
        with apply_lock(self.state_dir, self.cluster):
            if self.recheck is not None and self.recheck() != plan.observed_fingerprint:
                raise StalePlan(
                    "the cluster changed since this plan was made (another apply?); nothing was applied: plan again"
                )
            log = EventLog(self.state_dir / EVENTS_FILE)
            try:
                self._emit(log, "apply-started", cluster=plan.cluster, steps=len(plan.steps))
                by_node = plan.steps_by_node()
                outcomes: dict[str, NodeOutcome] = {}
                with ThreadPoolExecutor(max_workers=max(1, len(by_node))) as pool:
                    futures = {n: pool.submit(self._run_node, n, steps, log) for n, steps in by_node.items()}
                    for n, fut in futures.items():
                        outcomes[n] = fut.result()
                # The gateway last: routes are added only once every backend is up.
                final = plan.gateway_steps()
                if final:
                    outcomes["gateway"] = self._run_node("gateway", final, log)
                result = ApplyResult(outcomes)
                self._emit(log, "apply-finished", ok=result.ok)
                return result
            finally:
                log.close()

    def _emit(self, log: EventLog, event: str, **fields: Any) -> None:
        record = log.emit(event, **fields)
        if self.on_event is not None:
            self.on_event(record)

    def _clean_helpers(self, node: str, log: EventLog) -> None:
        """A node's finished or orphaned helper containers (a killed apply's copy still writing) go first: the
        apply lock is held, so no other apply of this cluster from this machine can be using them."""
        driver = self.drivers.get(node)
        if driver is None:
            return
        try:
            removed = driver.clean_helpers()
        except DriverError:
            return  # the node's first step says what is wrong with it
        if removed:
            self._emit(log, "helpers-removed", node=node, containers=removed)

    def _run_node(self, node: str, steps: list[Step], log: EventLog) -> NodeOutcome:
        outcome = NodeOutcome(node)
        if not self._stop.is_set():
            self._clean_helpers(node, log)
        for i, step in enumerate(steps):
            if self._stop.is_set():
                outcome.not_run = steps[i:]
                break
            self._emit(log, "step-started", node=node, step=step.kind.value, name=step.name)
            try:
                self._run_step(step)
            except Exception as exc:
                # Any failure stops this node and, after their current step, the others.
                self._stop.set()
                message = str(exc) or type(exc).__name__
                outcome.failed, outcome.error, outcome.not_run = step, message, steps[i + 1 :]
                self._emit(log, "step-failed", node=node, step=step.kind.value, name=step.name, error=message)
                break
            outcome.done.append(step)
            self._emit(log, "step-done", node=node, step=step.kind.value, name=step.name)
        return outcome

    def _progress(self, node: str, label: str) -> ProgressFn | None:
        if self.on_progress is None:
            return None
        report = self.on_progress
        return lambda done, total: report(node, label, done, total)

    def _run_ollama_step(self, step: Step) -> None:
        driver = self.ollama[step.node]
        if step.kind is StepKind.OLLAMA_DELETE:
            driver.delete(step.name)
        elif step.kind is StepKind.OLLAMA_PULL:
            driver.pull(step.name, progress=self._progress(step.node, f"pulling {step.name}"))
        elif step.kind is StepKind.OLLAMA_CREATE:
            assert step.ollama_model is not None
            driver.create(step.ollama_model)
        else:
            assert step.kind is StepKind.OLLAMA_PRELOAD and step.ollama_model is not None
            driver.preload(step.name, step.ollama_model.keep_alive)

    def _run_gateway_step(self, step: Step) -> None:
        if self.gateway is None:
            raise StepFailed("no gateway driver")
        assert step.gateway is not None
        if step.kind is StepKind.GATEWAY_WRITE:
            self.gateway.write_config(step.gateway)
        elif step.kind is StepKind.GATEWAY_RESTART:
            self.gateway.restart(step.gateway)
        else:
            self.gateway.wait_live(step.gateway, self.gateway_timeout)

    def _run_step(self, step: Step) -> None:
        if step.kind.value.startswith("ollama-"):
            self._run_ollama_step(step)
            return
        if step.kind.value.startswith("gateway-"):
            self._run_gateway_step(step)
            return
        driver = self.drivers[step.node]
        if step.kind in (StepKind.REMOVE_CONTAINER, StepKind.REMOVE_SERVICE):
            driver.remove_container(step.name)
        elif step.kind is StepKind.ADOPT_CONTAINER:
            driver.set_aside(step.name)
        elif step.kind is StepKind.REMOVE_FILE:
            assert step.file is not None
            driver.remove_file(step.file.volume, step.file.name)
        elif step.kind is StepKind.CREATE_VOLUME:
            assert step.volume is not None
            driver.create_volume(step.volume.name, {LABEL_CLUSTER: self.cluster, LABEL_NODE: step.node})
        elif step.kind is StepKind.COPY_FILE:
            f = step.file
            assert f is not None and f.source is not None
            progress: ProgressFn | None = None
            if self.on_progress is not None:
                report = self.on_progress
                progress = lambda done, total: report(step.node, f.name, done, total)  # noqa: E731
            driver.copy_file(f.volume, f.source, f.name, sha256=f.sha256, progress=progress)
        elif step.kind is StepKind.RUN_CONTAINER:
            assert step.container is not None
            driver.run_container(step.container)
        elif step.kind is StepKind.START_CONTAINER:
            driver.start_container(step.name)
        elif step.kind is StepKind.WAIT_HEALTHY:
            assert step.container is not None
            timeout = self.health_timeout.get(step.node, 300.0)
            try:
                self.health_check(step.container.health_url, timeout, self._stop.is_set, step.container.serves)
            except StepFailed as exc:
                logs = driver.container_logs(step.name, tail=3).strip().replace("\n", " | ")
                # Stopped, not left running: a running container with the spec's hash plans nothing, so the next
                # plan would say "No changes" over a model that never came up. Stopped, it is started again (and
                # waited for) by the next plan; `docker logs` keeps what it printed.
                stopped = "; the container is stopped (the next plan starts it again)"
                try:
                    driver.stop_container(step.name)
                except DriverError as stop_exc:
                    stopped = f"; stopping it failed too ({stop_exc})"
                raise StepFailed(f"{exc}" + (f"; last log lines: {logs}" if logs else "") + stopped) from None
        else:  # pragma: no cover - StepKind is closed
            raise AssertionError(step.kind)
