"""Watch mode: the scheduler in fake time, and the loop end to end with the fake drivers.

Every async test runs through `arun`, which fails the test when the coroutine leaves asyncio tasks behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest

from controller.drivers.fake import FakeDockerNode
from controller.effects import watch
from controller.effects.engine import Wiring
from controller.effects.health import Probe, Status, classify, endpoints
from controller.effects.power import PowerStore
from controller.effects.watch import (
    Action,
    FileSource,
    GitSource,
    LoopState,
    Metrics,
    Next,
    WatchLoop,
    Worker,
    decide,
    read_status,
    serve,
)
from specs import parse_spec
from specs.model import ClusterSpec, Node
from specs.validate import command_keys
from tests.controller.test_reconcile import SOURCES, SPEC
from tests.support.wiring import Wired

Arun = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture
def arun() -> Arun:
    """Run a coroutine in a fresh event loop; fail the test if it leaks asyncio tasks."""

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        async def checked() -> Any:
            result = await coro
            await asyncio.sleep(0)
            me = asyncio.current_task()
            leaked = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            if leaked:
                for t in leaked:
                    t.cancel()
                pytest.fail(f"leaked asyncio tasks: {leaked}")
            return result

        return asyncio.run(checked())

    return run


def test_the_leak_fixture_catches_a_leak(arun: Arun) -> None:
    async def leaky() -> None:
        asyncio.get_running_loop().create_task(asyncio.sleep(3600))

    with pytest.raises(pytest.fail.Exception, match="leaked asyncio tasks"):
        arun(leaky())


# --------------------------------------------------------------------------- the scheduler (pure)


@pytest.mark.parametrize(
    ("now", "state", "git", "expected"),
    [
        (0.0, LoopState(), False, Next(Action.RECONCILE, "start-up", 0.0)),
        (5.0, LoopState(last_run=0.0), False, Next(Action.SLEEP, "", 60.0)),
        (60.0, LoopState(last_run=0.0), False, Next(Action.RECONCILE, "interval", 60.0)),
        # a save settles before it counts; the interval still stands behind it
        (5.0, LoopState(last_run=0.0, changed_at=4.875), False, Next(Action.SLEEP, "", 5.125)),
        (5.25, LoopState(last_run=0.0, changed_at=5.0), False, Next(Action.RECONCILE, "spec changed", 5.25)),
        # a change before the first run: the first run covers it
        (
            9.0,
            LoopState(changed_at=1.0, change_reason="spec changed"),
            False,
            Next(Action.RECONCILE, "spec changed", 9),
        ),
        # git: fetch every interval, from the last fetch
        (0.0, LoopState(last_run=0.0), True, Next(Action.FETCH, "interval", 0.0)),
        (30.0, LoopState(last_run=10.0, last_fetch=0.0), True, Next(Action.SLEEP, "", 60.0)),
        (60.0, LoopState(last_run=10.0, last_fetch=0.0), True, Next(Action.FETCH, "interval", 60.0)),
        (70.0, LoopState(last_run=10.0, last_fetch=60.0), True, Next(Action.RECONCILE, "interval", 70.0)),
        (
            61.0,
            LoopState(last_run=10.0, last_fetch=60.5, changed_at=60.5, change_reason="new commit abc"),
            True,
            Next(Action.RECONCILE, "new commit abc", 61.0),
        ),
    ],
)
def test_decide(now: float, state: LoopState, git: bool, expected: Next) -> None:
    assert decide(now, state, interval=60.0, git=git, settle=0.25) == expected


class FakeTime:
    """A clock that only moves when the loop waits; scheduled callbacks fire at their time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.at: list[tuple[float, Callable[[], None]]] = []

    def clock(self) -> float:
        return self.now

    async def wait(self, wake: asyncio.Event, seconds: float) -> None:
        await asyncio.sleep(0)
        if wake.is_set():
            return
        until = self.now + seconds
        self.at.sort(key=lambda e: e[0])
        if self.at and self.at[0][0] <= until:
            t, fn = self.at.pop(0)
            self.now = max(self.now, t)
            fn()
            return
        self.now = until


class StubSource:
    def __init__(self) -> None:
        self.commits: list[str] = []
        self.fetched: list[float] = []
        self.clock: Callable[[], float] = lambda: 0.0

    spec_path = Path("cluster.yaml")
    revision = None

    def fetch(self) -> str | None:
        self.fetched.append(self.clock())
        return self.commits.pop(0) if self.commits else None

    def describe(self) -> dict[str, Any]:
        return {"mode": "stub"}


class StubWorker:
    """Records when it ran and why; takes `cost` seconds of fake time per run."""

    def __init__(self, ft: FakeTime, cost: float = 0.0) -> None:
        self.ft = ft
        self.cost = cost
        self.runs: list[tuple[float, str]] = []
        self.sweeps: list[float] = []
        self.source = StubSource()
        self.source.clock = ft.clock
        self.good = SimpleNamespace(loaded=SimpleNamespace(spec=SimpleNamespace(nodes=[])))  # no node sleeps
        self.stirring: list[str] = []
        self.dry_run = False
        self.cancelled = False

    def run(self, reason: str) -> dict[str, Any]:
        self.runs.append((self.ft.now, reason))
        self.ft.now += self.cost
        return {}

    def sweep(self) -> list[str]:
        self.sweeps.append(self.ft.now)
        return []

    def cancel(self) -> None:
        self.cancelled = True

    def say(self, line: str, is_error: bool) -> None:
        pass


def fake_loop(ft: FakeTime, worker: StubWorker, *, git: bool = False, interval: float = 60.0) -> WatchLoop:
    return WatchLoop(
        cast(Worker, worker),
        lambda: interval,
        git=git,
        clock=ft.clock,
        wall=ft.clock,
        wait=ft.wait,
        write_status=False,
    )


def test_timer_runs_every_interval_from_the_end_of_the_last_run(arun: Arun) -> None:
    ft = FakeTime()
    worker = StubWorker(ft, cost=5.0)
    arun(fake_loop(ft, worker).run(max_runs=4))
    assert worker.runs == [(0.0, "start-up"), (65.0, "interval"), (130.0, "interval"), (195.0, "interval")]
    assert worker.sweeps == [5.0, 70.0, 135.0, 200.0]  # health after every start-up and interval run


def test_a_save_settles_then_runs_once_and_the_timer_starts_again(arun: Arun) -> None:
    ft = FakeTime()
    worker = StubWorker(ft)
    loop = fake_loop(ft, worker)
    # an editor's save-rename-write: three events within 100 ms
    ft.at = [(10.0, loop.changed), (10.05, loop.changed), (10.1, loop.changed)]
    arun(loop.run(max_runs=3))
    assert [(round(t, 2), why) for t, why in worker.runs] == [
        (0.0, "start-up"),
        (10.3, "spec changed"),
        (70.3, "interval"),
    ]
    assert worker.sweeps == [0.0, 70.3]  # a save does not sweep health; the interval does


def test_a_save_during_a_run_runs_again(arun: Arun) -> None:
    ft = FakeTime()
    worker = StubWorker(ft, cost=5.0)
    loop = fake_loop(ft, worker)
    original = worker.run

    def run_and_save(reason: str) -> dict[str, Any]:
        out = original(reason)
        if len(worker.runs) == 1:
            loop.changed()  # saved while the first run was applying
        return out

    worker.run = run_and_save  # type: ignore[method-assign]
    arun(loop.run(max_runs=2))
    assert worker.runs == [(0.0, "start-up"), (5.2, "spec changed")]


def test_git_fetches_every_interval_and_a_new_commit_runs_at_once(arun: Arun) -> None:
    ft = FakeTime()
    worker = StubWorker(ft)
    worker.source.commits = [None, "c0ffee00" * 5]  # type: ignore[list-item]
    loop = fake_loop(ft, worker, git=True, interval=30.0)
    arun(loop.run(max_runs=3))
    assert worker.source.fetched == [0.0, 30.0, 60.0]
    assert [(round(t, 2), why) for t, why in worker.runs] == [
        (0.0, "start-up"),
        (30.2, "new commit c0ffee00c0ff"),
        (60.2, "interval"),
    ]


def test_stop_lets_the_run_finish_and_leaves(arun: Arun) -> None:
    ft = FakeTime()
    worker = StubWorker(ft, cost=1.0)
    loop = fake_loop(ft, worker)
    ft.at = [(30.0, loop.stop)]
    arun(loop.run())
    assert worker.runs == [(0.0, "start-up")] and worker.cancelled


# --------------------------------------------------------------------------- the loop with the fake drivers


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wired: Wired) -> dict[str, FakeDockerNode]:
    fakes = {n: FakeDockerNode(n, images={"llama:test"}, source_files=dict(SOURCES)) for n in ("box", "spare")}

    def factory(spec: ClusterSpec) -> Callable[[Node], FakeDockerNode]:
        return lambda node: fakes.setdefault(node.name, FakeDockerNode(node.name, reachable=False))

    wired.set(connect=factory)
    wired.set(gpu_probe=lambda nodes: {})
    wired.set(health_check=lambda url, timeout, cancelled, serves: None)
    wired.set(health=fake_health(set()))
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "cluster.yaml").write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    return fakes


def fake_health(down: set[str]) -> Callable[[ClusterSpec, Any], Any]:
    def check(spec: ClusterSpec, desired: Any) -> Any:
        probes = [
            Probe(e, Status.DOWN if e.node in down else Status.UP, latency=0.001) for e in endpoints(spec, desired)
        ]
        return classify(probes, 0.01)

    return check


class Said:
    def __init__(self) -> None:
        self.lines: list[tuple[str, bool]] = []

    def __call__(self, line: str, is_error: bool) -> None:
        self.lines.append((line, is_error))

    @property
    def errors(self) -> str:
        return "\n".join(line for line, e in self.lines if e)

    @property
    def text(self) -> str:
        return "\n".join(line for line, _ in self.lines)


def make_loop(
    source: FileSource | GitSource, state: Path, wiring: Wiring, *, dry_run: bool = False, interval: float = 600.0
) -> tuple[WatchLoop, Said, Metrics]:
    said, metrics = Said(), Metrics()
    worker = Worker(source, state, dry_run, metrics, said, wiring)
    return WatchLoop(worker, lambda: interval, git=isinstance(source, GitSource), settle=0.05), said, metrics


async def until(check: Callable[[], bool], timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def container_ctx(fake: FakeDockerNode, name: str) -> int | None:
    c = fake.containers.get(name)
    return c.config.context if c is not None and c.config is not None else None


def test_edit_apply_invalid_fix(engines: dict[str, FakeDockerNode], tmp_path: Path, arun: Arun, wired: Wired) -> None:
    spec = tmp_path / "cluster.yaml"
    loop, said, _ = make_loop(FileSource(spec), tmp_path / "state", wired.wiring)
    box = engines["box"]

    async def scenario() -> None:
        task = asyncio.create_task(serve(loop, watch_path=spec))
        try:
            await until(lambda: container_ctx(box, "homelab-chat") == 4096)
            # 1. an edit is planned and applied
            saved = time.monotonic()
            spec.write_text(SPEC.replace("context: 4096", "context: 8192"))
            await until(lambda: container_ctx(box, "homelab-chat") == 8192)
            print(f"edit applied {time.monotonic() - saved:.2f} s after the save (fake drivers)")
            # 2. an invalid spec: reported with its location, nothing applied
            before = dict(box.containers)
            runs = loop.runs
            spec.write_text(SPEC.replace("context: 4096", "contxt: 2048"))
            located = "cluster.yaml:20:5: models[0].contxt: unknown key (did you mean 'context'?)"
            # a run already under way when the file was saved may end first: wait for the run that read it
            await until(lambda: loop.runs > runs and located in said.errors)
            assert box.containers == before
            status = read_status(tmp_path / "state")
            assert status is not None and status["spec_errors"][0].endswith("unknown key (did you mean 'context'?)")
            # 3. infeasible: 30 GiB, all of it on a 24 GiB GPU: reported at the model, nothing applied
            runs = loop.runs
            spec.write_text(
                SPEC.replace("memory: {vram: 10GiB", "memory: {vram: 30GiB").replace(
                    "gpus: [0]}", "gpus: [0], cpu_offload: false}"
                )
            )
            await until(lambda: loop.runs > runs)
            assert box.containers == before
            assert "cluster.yaml:17:5: models[0]: cannot be placed:" in said.errors
            # 4. fixed: applied
            spec.write_text(SPEC.replace("context: 4096", "context: 2048"))
            await until(lambda: container_ctx(box, "homelab-chat") == 2048)
            await until(lambda: (read_status(tmp_path / "state") or {}).get("spec_errors") == [])
        finally:
            loop.stop()
            await task

    arun(scenario())
    status = read_status(tmp_path / "state")
    assert status is not None and status["last_run"]["ok"] and status["applied"]["spec_hash"]


def test_dry_run_prints_plans_and_applies_nothing(
    engines: dict[str, FakeDockerNode], tmp_path: Path, arun: Arun, wired: Wired
) -> None:
    spec = tmp_path / "cluster.yaml"
    loop, said, _ = make_loop(FileSource(spec), tmp_path / "state", wired.wiring, dry_run=True)

    async def scenario() -> None:
        task = asyncio.create_task(serve(loop, watch_path=spec))
        try:
            await until(lambda: "Plan: 8 to add, 0 to change, 0 to destroy." in said.text)
            spec.write_text(SPEC.split("  - name: tiny")[0])
            await until(lambda: "Plan: 5 to add, 0 to change, 0 to destroy." in said.text)
        finally:
            loop.stop()
            await task

    arun(scenario())
    assert engines["box"].containers == {} and engines["spare"].containers == {}
    assert {method for method, _ in engines["box"].calls} <= {
        "ping",
        "image_exists",
        "list_containers",
        "inspect_all",
        "list_volumes",
        "volume_names",
        "service_status",
    }
    assert engines["box"].volumes == {}


def test_status_file_metrics_and_homelab_status(
    engines: dict[str, FakeDockerNode],
    tmp_path: Path,
    arun: Arun,
    monkeypatch: pytest.MonkeyPatch,
    wired: Wired,
) -> None:
    wired.set(health=fake_health({"spare"}))
    recovered: list[str] = []

    async def recover(spec: ClusterSpec, nodes: Sequence[str], state: Path, desired: Any) -> list[Any]:
        recovered.extend(nodes)
        return []

    spec = tmp_path / "cluster.yaml"
    loop, _, metrics = make_loop(FileSource(spec), tmp_path / "state", wired.wiring)
    loop.recover = recover
    port = metrics.serve(0)
    scraped = ""

    async def scenario() -> None:
        nonlocal scraped
        task = asyncio.create_task(serve(loop, watch_path=spec))
        try:
            await until(lambda: bool(recovered) and bool((read_status(tmp_path / "state") or {}).get("health")))
            async with httpx.AsyncClient(trust_env=False) as client:
                scraped = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        finally:
            loop.stop()
            await task

    try:
        arun(scenario())
    finally:
        metrics.close()
    # a DOWN node starts recovery while the others are reconciled
    assert recovered == ["spare"]
    assert set(engines["box"].containers) == {"homelab-chat", "homelab-coder"}
    assert 'homelab_endpoint_up{endpoint="spare/docker",kind="docker",tier="cpu"} 0.0' in scraped
    assert 'homelab_endpoint_up{endpoint="box/docker",kind="docker",tier="remote"} 1.0' in scraped
    assert 'homelab_tier_state{state="DOWN",tier="cpu"} 1.0' in scraped
    assert 'homelab_reconcile_total{trigger="start-up"} 1.0' in scraped
    assert "homelab_reconcile_duration_seconds_bucket" in scraped
    assert "homelab_reconcile_failures_total 0.0" in scraped
    assert "homelab_reconcile_duration_seconds_count 1.0" in scraped
    assert 'homelab_planned_vram_bytes{gpu="0",node="box"} 1.073741824e+10' in scraped
    assert 'homelab_recovery_attempts_total{node="spare"} 1.0' in scraped
    assert "homelab_spec_valid 1.0" in scraped

    status = read_status(tmp_path / "state")
    assert status is not None
    assert status["source"] == {"mode": "file", "path": str(spec)}
    assert status["last_run"]["trigger"] == "start-up" and status["last_run"]["ok"]
    assert status["last_run"]["plan"]["summary"] == {"add": 8, "change": 0, "destroy": 0}
    assert status["health"]["nodes"] == {"box": "up", "spare": "down"}
    assert status["applied"]["spec_hash"] and status["applied"]["commit"] is None

    result = wired.invoke(["status"])
    assert result.exit_code == 0, result.stderr
    assert f"watch (pid {status['pid']}): {spec}" in result.stdout
    assert f"  applied: {status['applied']['spec_hash']}" in result.stdout
    assert "  health: DEGRADED (box up, spare down)" in result.stdout or "  health: DOWN" in result.stdout
    result = wired.invoke(["status", "--json"])
    assert json.loads(result.stdout)["watch"]["health"]["nodes"]["spare"] == "down"


# --------------------------------------------------------------------------- git mode


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_git_mode_applies_each_commit_and_reports_a_force_push(
    engines: dict[str, FakeDockerNode], tmp_path: Path, arun: Arun, wired: Wired
) -> None:
    bare, work = tmp_path / "repo.git", tmp_path / "work"
    git(tmp_path, "init", "--quiet", "--bare", "--initial-branch=main", str(bare))
    git(tmp_path, "clone", "--quiet", str(bare), str(work))
    git(work, "checkout", "--quiet", "-b", "main")
    (work / "cluster.yaml").write_text(SPEC)
    git(work, "add", "cluster.yaml")
    git(work, "commit", "--quiet", "-m", "first")
    git(work, "push", "--quiet", "origin", "main")
    first = git(work, "rev-parse", "HEAD")

    source = GitSource(str(bare), "main", "cluster.yaml", watch.clone_dir(tmp_path / "state", str(bare), "main"))
    source.open()
    loop, said, _ = make_loop(source, tmp_path / "state", wired.wiring, interval=0.3)
    box = engines["box"]

    def applied() -> str | None:
        return cast(str | None, ((read_status(tmp_path / "state") or {}).get("applied") or {}).get("commit"))

    async def scenario() -> None:
        task = asyncio.create_task(serve(loop, watch_path=None))
        try:
            await until(lambda: applied() == first)
            (work / "cluster.yaml").write_text(SPEC.replace("context: 4096", "context: 8192"))
            git(work, "commit", "--quiet", "-am", "bigger context")
            git(work, "push", "--quiet", "origin", "main")
            second = git(work, "rev-parse", "HEAD")
            await until(lambda: applied() == second)
            assert container_ctx(box, "homelab-chat") == 8192
            # rewrite history and force-push: reported, not applied
            git(work, "reset", "--quiet", "--hard", first)
            (work / "cluster.yaml").write_text(SPEC.replace("context: 4096", "context: 1024"))
            git(work, "commit", "--quiet", "-am", "rewritten")
            git(work, "push", "--quiet", "--force", "origin", "main")
            await until(lambda: "force-push or divergence: not applied; fix the branch" in said.errors)
            await until(lambda: bool((read_status(tmp_path / "state") or {}).get("fetch_error")))
            assert applied() == second and container_ctx(box, "homelab-chat") == 8192
        finally:
            loop.stop()
            await task

    arun(scenario())
    assert said.errors.count("force-push or divergence") == 1  # reported once, not every interval


def test_watch_command_line_mistakes(engines: dict[str, FakeDockerNode], wired: Wired) -> None:
    result = wired.invoke(["watch", "--interval", "soon"])
    assert result.exit_code == 1 and result.stderr.startswith("error: --interval:")
    result = wired.invoke(["watch", "--git", "/nowhere.git", "-f", "cluster.yaml"])
    assert result.exit_code == 1 and "--git and -f: choose one" in result.stderr
    result = wired.invoke(["watch", "--git", "/nowhere.git"])
    assert result.exit_code == 1 and result.stderr.startswith("error: git: git clone failed:")


def test_gpu_used_and_recovery_series_are_exported() -> None:
    """`homelab_gpu_used_bytes` is nvidia-smi's figure per GPU where it was found, absent where it was not;
    every observed node has a recovery-attempts series from the first run (0 until recovery starts)."""
    from types import SimpleNamespace

    from controller.drivers.gpu import GpuInfo
    from controller.effects.gpu_use import GpuFinding, GpuReality
    from solver.problem import GpuUse

    metrics = Metrics()
    worker = Worker(FileSource(Path("cluster.yaml")), None, False, metrics, lambda line, error: None)
    found = GpuInfo(0, "H100", "GPU-1", 80 * 2**30, 5 * 2**30, 75 * 2**30, "550")
    prepared = SimpleNamespace(
        placement=SimpleNamespace(gpus=(GpuUse("a", 0, "H100", 70 * 2**30, 3 * 2**30),)),
        gpus=GpuReality((GpuFinding("a", 0, found, 0, 0), GpuFinding("b", 0, None, 0, 2**30))),
        observed=SimpleNamespace(nodes={"a": None, "b": None}),
    )
    worker._placement_metrics(prepared)  # type: ignore[arg-type]  # only the fields it reads
    r = metrics.registry
    assert r.get_sample_value("homelab_gpu_used_bytes", {"node": "a", "gpu": "0"}) == 5 * 2**30
    assert r.get_sample_value("homelab_gpu_used_bytes", {"node": "b", "gpu": "0"}) is None
    assert r.get_sample_value("homelab_planned_vram_bytes", {"node": "a", "gpu": "0"}) == 3 * 2**30
    assert r.get_sample_value("homelab_recovery_attempts_total", {"node": "b"}) == 0.0


def test_a_spec_from_git_may_not_run_commands_unless_allowed(tmp_path: Path) -> None:
    """Spec is code: a `cmd:` secret or a wake command pushed to the watched repository would run on this
    machine; git mode refuses such a spec (located errors) unless --allow-spec-commands."""
    bare, work = tmp_path / "repo.git", tmp_path / "work"
    git(tmp_path, "init", "--quiet", "--bare", "--initial-branch=main", str(bare))
    git(tmp_path, "clone", "--quiet", str(bare), str(work))
    git(work, "checkout", "--quiet", "-b", "main")
    (work / "cluster.yaml").write_text(SPEC + "secrets:\n  key: cmd:touch /tmp/pwned\n")
    git(work, "add", "cluster.yaml")
    git(work, "commit", "--quiet", "-m", "first")
    git(work, "push", "--quiet", "origin", "main")
    for allowed in (False, True):
        clone = watch.clone_dir(tmp_path / f"state-{allowed}", str(bare), "main")
        source = GitSource(str(bare), "main", "cluster.yaml", clone)
        source.open()
        said = Said()
        worker = Worker(source, tmp_path / "state", True, Metrics(), said, Wiring(), allow_spec_commands=allowed)
        chosen = worker.refresh_spec()
        if allowed:
            assert chosen is not None and worker.spec_errors == []
        else:
            assert chosen is None
            assert len(worker.spec_errors) == 1
            assert worker.spec_errors[0].startswith(f"{source.spec_path}:")
            assert "secrets.key: a `cmd:` secret runs a command here" in worker.spec_errors[0]
    file_worker = Worker(FileSource(work / "cluster.yaml"), tmp_path / "state", True, Metrics(), Said())
    assert file_worker.refresh_spec() is not None  # a local file is the operator's own: allowed


def test_a_gateway_process_from_git_is_refused_unless_allowed(tmp_path: Path) -> None:
    """`gateway.command` (mode process: started on this machine) and `gateway.config_path` (a file homelab
    overwrites, keeping the old text as .bak) in a pushed spec are refused like a `cmd:` secret, each located;
    `--allow-spec-commands` accepts them."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    gateway = (
        f"gateway: {{mode: process, command: [sh, -c, 'touch {tmp_path}/pwned'], config_path: {victim},"
        " master_key: env:KEY}\n"
    )
    bare, work = tmp_path / "repo.git", tmp_path / "work"
    git(tmp_path, "init", "--quiet", "--bare", "--initial-branch=main", str(bare))
    git(tmp_path, "clone", "--quiet", str(bare), str(work))
    git(work, "checkout", "--quiet", "-b", "main")
    (work / "cluster.yaml").write_text(SPEC + gateway)
    git(work, "add", "cluster.yaml")
    git(work, "commit", "--quiet", "-m", "first")
    git(work, "push", "--quiet", "origin", "main")
    for allowed in (False, True):
        clone = watch.clone_dir(tmp_path / f"s-{allowed}", str(bare), "main")
        source = GitSource(str(bare), "main", "cluster.yaml", clone)
        source.open()
        worker = Worker(source, tmp_path / "state", True, Metrics(), Said(), Wiring(), allow_spec_commands=allowed)
        chosen = worker.refresh_spec()
        if allowed:
            assert chosen is not None and worker.spec_errors == []
            continue
        assert chosen is None
        assert len(worker.spec_errors) == 2
        line = len(SPEC.splitlines()) + 1
        config, command = worker.spec_errors
        assert command.startswith(f"{source.spec_path}:{line}:")
        assert "gateway.command: mode process: the gateway's command runs here" in command
        assert "gateway.config_path: homelab writes the gateway's config" in config
        assert "--allow-spec-commands" in config
    assert victim.read_text() == "precious\n" and not (tmp_path / "pwned").exists()


def test_a_sleep_command_is_a_command_key() -> None:
    """`power.sleep_command` runs on the node over SSH: git mode refuses it like a Docker restart command; the
    default (`sudo -S systemctl suspend`) is not the spec's own command and passes."""
    extra = "    ssh: {user: u}\n    wake: {wol: {mac: 'aa:bb:cc:dd:ee:ff'}}\n"
    extra += "    power: {sleep_after: 10m, sleep_command: 'rm -rf /'}\n"
    text = SPEC.replace("    ram: 64GiB\n", "    ram: 64GiB\n" + extra, 1)
    spec = parse_spec(text, "cluster.yaml").spec
    assert (("nodes", 0, "power", "sleep_command"), "runs on the node over SSH") in command_keys(spec)
    default = parse_spec(text.replace(", sleep_command: 'rm -rf /'", ""), "cluster.yaml").spec
    assert not any(path[2:3] == ("power",) for path, _ in command_keys(default))
    assert default.nodes[0].power is not None
    assert default.nodes[0].power.command_for(default.nodes[0].os) == "sudo -S systemctl suspend"


def test_a_node_homelab_put_to_sleep_is_not_reconciled_until_it_wakes(
    engines: dict[str, FakeDockerNode], tmp_path: Path, wired: Wired
) -> None:
    """Whoever wakes a node brings its containers back, one at a time: the watch's own reconcile leaves a sleeping
    (or waking) node's steps out rather than racing it for the apply lock."""
    spec = tmp_path / "cluster.yaml"
    spec.write_text(SPEC)
    state = tmp_path / "state"
    PowerStore(state).put("box", "asleep", "idle")
    said = Said()
    worker = Worker(FileSource(spec), state, False, Metrics(), said, wired.wiring)
    result = worker.run("start-up")
    assert result["ok"], result.get("error")
    assert not engines["box"].containers
    assert "node box: asleep (homelab put it to sleep): its steps wait until it is awake" in said.text
    PowerStore(state).put("box", None)
    assert worker.run("interval")["ok"]
    assert engines["box"].containers


TOKEN = "tok3n-s3cret"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"https://user:{TOKEN}@git.example.lan/h/c.git", "https://user:***@git.example.lan/h/c.git"),
        (f"https://{TOKEN}@github.com/h/c.git", "https://***@github.com/h/c.git"),
        (f"fatal: unable to access 'http://u:{TOKEN}@127.0.0.1:1/r/'", "fatal: unable to access 'http://u:***@127.0.0.1:1/r/'"),
        ("ssh://git@git.example.lan/h/c.git", "ssh://git@git.example.lan/h/c.git"),
        ("git@git.example.lan:h/c.git", "git@git.example.lan:h/c.git"),
        ("/srv/git/c.git", "/srv/git/c.git"),
    ],
)  # fmt: skip
def test_a_credential_in_a_git_url_is_redacted(url: str, shown: str) -> None:
    assert watch.redact_url(url) == shown


def test_a_git_credential_is_never_printed_or_stored(tmp_path: Path) -> None:
    """`homelab watch --git https://user:TOKEN@…`: the start line, watch.json (0600) and `homelab status`'s text
    show `user:***`. The repository is a local one the URL is rewritten to (git's insteadOf): no network."""
    bare, work = tmp_path / "repo.git", tmp_path / "work"
    git(tmp_path, "init", "--quiet", "--bare", "--initial-branch=main", str(bare))
    git(tmp_path, "clone", "--quiet", str(bare), str(work))
    git(work, "checkout", "--quiet", "-b", "main")
    (work / "cluster.yaml").write_text(SPEC)
    git(work, "add", "cluster.yaml")
    git(work, "commit", "--quiet", "-m", "first")
    git(work, "push", "--quiet", "origin", "main")
    url = f"https://user:{TOKEN}@git.example.invalid/h/c.git"
    env = {
        **os.environ,
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": f"url.{bare}.insteadOf",
        "GIT_CONFIG_VALUE_0": url,
        "HOMELAB_LOCK_DIR": str(tmp_path / "locks"),
    }
    (tmp_path / "locks").mkdir()
    state = tmp_path / "state"
    argv = ["watch", "--git", url, "--branch", "main", "--path", "cluster.yaml", "--state-dir", str(state)]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from controller.cli import main; main()", *argv, "--dry-run", "--interval", "1h"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        deadline = time.monotonic() + 60
        while not (state / watch.STATUS_FILE).exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=30)
    assert first.startswith("watching https://user:***@git.example.invalid/h/c.git (main) cluster.yaml at "), first
    assert TOKEN not in first + rest
    status_file = state / watch.STATUS_FILE
    assert (status_file.stat().st_mode & 0o777) == 0o600
    text = status_file.read_text()
    assert TOKEN not in text and "https://user:***@git.example.invalid/h/c.git" in text
    status = watch.read_status(state)
    assert status is not None
    lines = watch.describe_watch(status)
    assert lines[0].endswith("https://user:***@git.example.invalid/h/c.git (main) cluster.yaml")
    assert not any(TOKEN in line for line in lines)
    old = {**status, "source": {**status["source"], "url": url}}  # a watch.json written by an older homelab
    assert not any(TOKEN in line for line in watch.describe_watch(old))
