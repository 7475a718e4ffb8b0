"""The reconcile core with the shipped fake Docker driver: desired → diff → plan → apply, table-driven."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from controller.core.diff import Action, describe_config_change
from controller.core.plan import Plan, StepKind, render_text
from controller.core.state import ContainerConfig
from controller.drivers.fake import FakeDockerNode
from controller.effects.apply import (
    EVENTS_FILE,
    LOCK_DIR_ENV,
    Executor,
    LockHeld,
    LockUnsafe,
    StalePlan,
    StepFailed,
    apply_lock,
    cluster_lock_path,
)
from controller.effects.engine import CachingConnect, Prepared, Session, Wiring
from solver.place import SolveParams
from specs import parse_spec
from specs.model import ClusterSpec, Node
from tests.support.wiring import prepare

SPEC = """\
cluster: {name: lab}
nodes:
  - name: box
    tier: remote
    address: 127.0.0.1
    docker: {endpoint: "unix:///tmp/none.sock"}
    gpus: [{index: 0, name: RTX 3090, vram: 24GiB}, {index: 1, name: RTX 3060, vram: 12GiB}]
    ram: 64GiB
    llamacpp: {image: "llama:test", ports: 3000-3009, volume: models}
  - name: spare
    tier: cpu
    address: 127.0.0.2
    docker: {endpoint: "unix:///tmp/none2.sock"}
    ram: 16GiB
    llamacpp: {image: "llama:test", ports: 3100-3109}
models:
  - name: chat
    runtime: llamacpp
    source: {gguf: /srv/models/chat.gguf}
    context: 4096
    placement: {node: box, gpus: [0]}
    memory: {vram: 10GiB, layers: 32}
  - name: coder
    runtime: llamacpp
    source: {gguf: /srv/models/coder.gguf}
    placement: {node: box, gpus: [1]}
    memory: {vram: 5GiB, layers: 28}
  - name: tiny
    runtime: llamacpp
    source: {gguf: /srv/models/tiny.gguf}
    placement: {node: spare, cpu_only: true}
    memory: {vram: 1GiB, layers: 12}
"""

SOURCES = {"/srv/models/chat.gguf": 10_000, "/srv/models/coder.gguf": 5_000, "/srv/models/tiny.gguf": 1_000}


def spec_of(text: str = SPEC) -> ClusterSpec:
    return parse_spec(text, "cluster.yaml").spec


class Lab:
    """Two fake engines and the health checks the executor asked for, in order."""

    def __init__(self) -> None:
        self.engines = {
            name: FakeDockerNode(name, images={"llama:test"}, source_files=dict(SOURCES)) for name in ("box", "spare")
        }
        self.health: list[str] = []

    def connect(self, node: Node) -> FakeDockerNode:
        return self.engines[node.name]

    def prepare(self, spec: ClusterSpec) -> Prepared:
        return prepare(spec, CachingConnect(self.connect), SolveParams(time_limit=5, workers=1))

    def apply(self, spec: ClusterSpec, tmp: Path) -> Plan:
        plan = self.prepare(spec).plan
        ex = Executor(spec.cluster.name, self.engines, tmp, health_check=self._healthy)
        result = ex.apply(plan)
        assert result.ok, result.summary()
        return plan

    def _healthy(self, url: str, timeout: float, cancelled: object, serves: tuple[str, ...] = ()) -> None:
        self.health.append(url)


def steps(plan: Plan) -> list[tuple[str, str, str]]:
    return [(s.node, s.kind.value, s.name) for s in plan.steps]


def test_first_reconcile_from_nothing_then_nothing_to_do(tmp_path: Path) -> None:
    lab = Lab()
    spec = spec_of()
    plan = lab.prepare(spec).plan
    assert steps(plan) == [
        ("box", "create-volume", "models"),
        ("box", "copy-file", "models/chat.gguf"),
        ("box", "copy-file", "models/coder.gguf"),
        ("box", "run-container", "homelab-chat"),  # GPU 0 first,
        ("box", "wait-healthy", "homelab-chat"),  # healthy before the next starts
        ("box", "run-container", "homelab-coder"),
        ("box", "wait-healthy", "homelab-coder"),
        ("spare", "create-volume", "homelab-models"),
        ("spare", "copy-file", "homelab-models/tiny.gguf"),
        ("spare", "run-container", "homelab-tiny"),
        ("spare", "wait-healthy", "homelab-tiny"),
    ]
    assert plan.counts() == (8, 0, 0)  # 2 volumes, 3 files, 3 containers
    lab.apply(spec, tmp_path)
    box = lab.engines["box"]
    assert [c for c in box.calls if c[0] in ("run_container", "copy_file")] == [
        ("copy_file", "chat.gguf"),
        ("copy_file", "coder.gguf"),
        ("run_container", "homelab-chat"),
        ("run_container", "homelab-coder"),
    ]
    # Nodes run in parallel; on one node, GPU 0's container is waited for before GPU 1's.
    assert [url for url in lab.health if "127.0.0.1" in url] == [
        "http://127.0.0.1:3000/health",
        "http://127.0.0.1:3001/health",
    ]
    assert sorted(lab.health) == [
        "http://127.0.0.1:3000/health",
        "http://127.0.0.1:3001/health",
        "http://127.0.0.2:3100/health",
    ]
    chat = box.containers["homelab-chat"].config
    assert chat is not None and chat.gpus == (0,) and chat.gpu_access == "nvidia"
    tiny = lab.engines["spare"].containers["homelab-tiny"].config
    assert tiny is not None and tiny.gpus == () and tiny.gpu_access == "none" and tiny.gpu_layers == 0
    again = lab.prepare(spec).plan
    assert again.in_sync and again.steps == () and again.changes == ()
    assert render_text(again).endswith(
        "No changes. The cluster matches the spec.\nPlan: 0 to add, 0 to change, 0 to destroy.\n"
    )


def test_changing_one_context_replaces_only_that_container(tmp_path: Path) -> None:
    lab = Lab()
    lab.apply(spec_of(), tmp_path)
    plan = lab.prepare(spec_of(SPEC.replace("context: 4096", "context: 8192"))).plan
    assert [(c.action, c.name, c.reason) for c in plan.changes] == [
        (Action.REPLACE, "homelab-chat", "config changed: context 4096 → 8192")
    ]
    assert steps(plan) == [
        ("box", "remove-container", "homelab-chat"),
        ("box", "run-container", "homelab-chat"),
        ("box", "wait-healthy", "homelab-chat"),
    ]
    assert plan.counts() == (1, 0, 1)


def test_removing_a_model_removes_only_its_container(tmp_path: Path) -> None:
    lab = Lab()
    lab.apply(spec_of(), tmp_path)
    text = SPEC.split("  - name: tiny")[0]
    plan = lab.prepare(spec_of(text)).plan
    assert [(c.action, c.node, c.name, c.reason) for c in plan.changes] == [
        (Action.DELETE, "spare", "homelab-models/tiny.gguf", "no model in the spec uses it"),
        (Action.DELETE, "spare", "homelab-tiny", "not in spec"),
    ]
    # the container that reads the file goes first
    assert steps(plan) == [
        ("spare", "remove-container", "homelab-tiny"),
        ("spare", "remove-file", "homelab-models/tiny.gguf"),
    ]
    lab.apply(spec_of(text), tmp_path)
    assert "tiny.gguf" not in lab.engines["spare"].volumes["homelab-models"]
    assert lab.prepare(spec_of(text)).plan.empty


def test_a_model_placed_elsewhere_keeps_its_file_where_it_was(tmp_path: Path) -> None:
    """Only a file no model in the spec names is pruned: moving back must not cost another copy."""
    lab = Lab()
    lab.apply(spec_of(), tmp_path)
    moved = SPEC.replace("placement: {node: spare, cpu_only: true}", "placement: {node: box, cpu_only: true}")
    plan = lab.prepare(spec_of(moved)).plan
    assert ("spare", "remove-container", "homelab-tiny") in steps(plan)
    assert not [s for s in steps(plan) if s[1] == "remove-file"]
    lab.apply(spec_of(moved), tmp_path)
    assert "tiny.gguf" in lab.engines["spare"].volumes["homelab-models"]


def test_a_stopped_container_is_started_again(tmp_path: Path) -> None:
    lab = Lab()
    lab.apply(spec_of(), tmp_path)
    box = lab.engines["box"]
    box.containers["homelab-coder"] = replace(box.containers["homelab-coder"], status="exited", exit_code=137)
    plan = lab.prepare(spec_of()).plan
    assert [(c.action, c.name, c.reason) for c in plan.changes] == [
        (Action.UPDATE, "homelab-coder", "container exited (code 137): start it")
    ]
    assert steps(plan) == [("box", "start-container", "homelab-coder"), ("box", "wait-healthy", "homelab-coder")]
    assert plan.counts() == (0, 1, 0)


def test_foreign_containers_are_never_touched(tmp_path: Path) -> None:
    lab = Lab()
    lab.engines["box"].foreign = {"homelab-chat-by-hand", "plex"}
    lab.apply(spec_of(), tmp_path)
    assert all(name not in ("plex", "homelab-chat-by-hand") for _, name in lab.engines["box"].calls)
    assert lab.prepare(spec_of()).plan.in_sync


def test_an_unreachable_node_is_not_empty(tmp_path: Path) -> None:
    lab = Lab()
    lab.apply(spec_of(), tmp_path)
    lab.engines["spare"].reachable = False
    prepared = lab.prepare(spec_of())
    plan = prepared.plan
    assert plan.steps == ()
    assert plan.unreachable == {"spare": "spare: connection refused"}
    assert not plan.in_sync
    assert [(c.node, c.name) for c in plan.deferred] == [
        ("spare", "homelab-models"),
        ("spare", "homelab-models/tiny.gguf"),
        ("spare", "homelab-tiny"),
    ]
    text = render_text(plan)
    assert "node spare: UNREACHABLE (spare: connection refused)" in text
    assert text.endswith("No changes on the nodes that answered.\nPlan: 0 to add, 0 to change, 0 to destroy.\n")


def test_golden_plan_text(tmp_path: Path) -> None:
    lab = Lab()
    lab.apply(spec_of(), tmp_path)
    box = lab.engines["box"]
    box.containers["homelab-old"] = replace(box.containers["homelab-coder"], name="homelab-old", model="old")
    box.containers["homelab-coder"] = replace(box.containers["homelab-coder"], status="exited", exit_code=1)
    changed = SPEC.replace("    context: 4096\n", "    context: 8192\n    kv_cache: q8_0\n")
    plan = lab.prepare(spec_of(changed)).plan
    assert render_text(plan) == (
        "node box:\n"
        "  -/+ container homelab-chat  (config changed: cache_type f16 → q8_0, context 4096 → 8192)\n"
        "    ~ container homelab-coder  (container exited (code 1): start it)\n"
        "    - container homelab-old  (not in spec)\n"
        "Plan: 1 to add, 1 to change, 2 to destroy.\n"
    )


def test_file_copy_failure_stops_everything_and_says_what_was_not_done(tmp_path: Path) -> None:
    lab = Lab()
    lab.engines["box"].fail_on = {("copy_file", "coder.gguf")}
    spec = spec_of()
    plan = lab.prepare(spec).plan
    result = Executor(spec.cluster.name, lab.engines, tmp_path, health_check=lab._healthy).apply(plan)
    assert not result.ok
    box = result.outcomes["box"]
    assert box.failed is not None and box.failed.name == "models/coder.gguf"
    assert box.error == "copy_file coder.gguf failed (injected)"
    assert [s.kind for s in box.not_run] == [StepKind.RUN_CONTAINER, StepKind.WAIT_HEALTHY] * 2
    assert "homelab-chat" not in lab.engines["box"].containers  # no container before its files are verified
    events = [json.loads(line) for line in (tmp_path / EVENTS_FILE).read_text().splitlines()]
    assert events[0]["event"] == "apply-started"
    failed = [e for e in events if e["event"] == "step-failed"]
    assert [(e["node"], e["name"]) for e in failed] == [("box", "models/coder.gguf")]
    assert events[-1]["event"] == "apply-finished" and events[-1]["ok"] is False
    assert "FAILED at copy-file models/coder.gguf" in result.summary()


def test_a_moved_model_says_where_it_went(tmp_path: Path) -> None:
    lab = Lab()
    lab.apply(spec_of(), tmp_path)
    moved = SPEC.replace("placement: {node: spare, cpu_only: true}", "placement: {node: box, cpu_only: true}")
    plan = lab.prepare(spec_of(moved)).plan
    gone = [(c.node, c.name, c.reason) for c in plan.changes if c.action is Action.DELETE and c.kind == "container"]
    assert gone == [("spare", "homelab-tiny", "tiny is placed on box now")]


def test_health_timeout_fails_the_step(tmp_path: Path) -> None:
    lab = Lab()
    spec = spec_of()

    def never(url: str, timeout: float, cancelled: object, serves: tuple[str, ...] = ()) -> None:
        # Only box's servers never answer: were spare's to fail too, spare (no files to copy) could fail first
        # and stop box after its current step, with no error of its own (seen in CI).
        if "127.0.0.1" in url:
            raise StepFailed(f"{url} did not answer 200 within {timeout:g}s (last: loading (503))")

    result = Executor(spec.cluster.name, lab.engines, tmp_path, health_check=never).apply(lab.prepare(spec).plan)
    assert (
        result.outcomes["box"].error
        == "http://127.0.0.1:3000/health did not answer 200 within 300s (last: loading (503));"
        " the container is stopped (the next plan starts it again)"
    )
    assert "homelab-coder" not in lab.engines["box"].containers  # the next GPU container never started


def test_one_apply_at_a_time(tmp_path: Path) -> None:
    with apply_lock(tmp_path), pytest.raises(LockHeld, match="another homelab apply is running"):
        Executor("lab", {}, tmp_path).apply(Plan("lab", "x", (), ()))


def test_a_symlink_at_the_cluster_lock_is_not_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A symlink planted in the lock directory (another local user's, in /run/lock) is never opened: its target is
    neither created, truncated nor written with our pid, and the error says why."""
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    (tmp_path / "locks").mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    cluster_lock_path("lab").symlink_to(victim)
    with pytest.raises(LockUnsafe, match=r"lock file .* is a symbolic link; not followed"):
        Executor("lab", {}, tmp_path / "state").apply(Plan("lab", "x", (), ()))
    assert victim.read_text() == "precious\n"
    cluster_lock_path("lab").unlink()
    cluster_lock_path("lab").symlink_to(tmp_path / "would-be-created")  # dangling: O_CREAT would make it
    with pytest.raises(LockUnsafe, match="symbolic link"):
        Executor("lab", {}, tmp_path / "state").apply(Plan("lab", "x", (), ()))
    assert not (tmp_path / "would-be-created").exists()


def test_a_lock_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "apply.lock")
    with pytest.raises(LockUnsafe, match="is not a regular file"):
        Executor("lab", {}, tmp_path).apply(Plan("lab", "x", (), ()))


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_another_users_lock_file_is_refused(tmp_path: Path) -> None:
    """A lock file another (non-root) user made first is not ours to trust: refused, not written."""
    lock = tmp_path / "apply.lock"
    lock.write_text("4242\n")
    os.chown(lock, 54321, 54321)
    with pytest.raises(LockUnsafe, match=r"belongs to another user \(uid 54321\)"):
        Executor("lab", {}, tmp_path).apply(Plan("lab", "x", (), ()))
    assert lock.read_text() == "4242\n"


def test_a_held_lock_shows_its_holder_escaped_and_bounded(tmp_path: Path) -> None:
    """Another process holds the lock (the existing message); the text in the lock file, were it not a pid, is shown
    escaped and cut, never as terminal control or a second line."""
    with apply_lock(tmp_path):
        with pytest.raises(LockHeld, match=rf"another homelab apply is running \(pid {os.getpid()}\)"):
            Executor("lab", {}, tmp_path).apply(Plan("lab", "x", (), ()))
        (tmp_path / "apply.lock").write_text("\x1b]0;pwned\x07\nerror: all is fine" + "x" * 500)
        with pytest.raises(LockHeld) as info:
            Executor("lab", {}, tmp_path).apply(Plan("lab", "x", (), ()))
    message = str(info.value)
    assert message.startswith("another homelab apply is running (pid unknown: '\\x1b]0;pwned\\x07\\nerror")
    assert "\n" not in message and "\x1b" not in message and len(message) < 200 + len(str(tmp_path))


def test_saved_plan_round_trips() -> None:
    plan = Lab().prepare(spec_of()).plan
    again = Plan.from_json(json.loads(plan.dumps()))
    assert again == plan


def test_command_only_change_is_described() -> None:
    base = ContainerConfig("img", ("-m", "/models/a", "-t", "2"), "a", 4096, 10, 3000, "a", "f16", (), "none", "v")
    assert describe_config_change(base, replace(base, command=("-m", "/models/a", "-t", "4"))) == "command 2 → 4"
    assert describe_config_change(None, base) == "its configuration label is missing or unreadable"
    assert describe_config_change(base, replace(base, gpus=(0,), gpu_layers=33)) == "gpu_layers 10 → 33, gpus[0] added"


def test_gpu_containers_are_left_to_homelab_to_restart_cpu_ones_to_docker(tmp_path: Path) -> None:
    """Docker restarts `unless-stopped` containers all at once when it starts: GPU ones would deadlock CUDA."""
    lab = Lab()
    lab.apply(spec_of(), tmp_path)
    desired = {
        c.model: c.config
        for node in lab.prepare(spec_of()).desired.nodes.values()
        for c in node.containers
        if c.config is not None
    }
    assert desired["chat"].gpu_layers > 0 and desired["chat"].restart_policy == "no"
    assert desired["coder"].restart_policy == "no"
    assert desired["tiny"].gpu_layers == 0 and desired["tiny"].restart_policy == "unless-stopped"


def test_files_are_pruned_only_from_the_model_volumes_of_the_spec(tmp_path: Path) -> None:
    """The gateway's labelled config volume (and a model volume the spec no longer names) is never pruned."""
    lab = Lab()
    lab.apply(spec_of(), tmp_path)
    lab.engines["box"].volumes["homelab-gateway"] = {"config.yaml": 900, "config.yaml.bak": 880}
    lab.engines["box"].volumes["old-models"] = {"retired.gguf": 5_000}
    assert lab.prepare(spec_of()).plan.empty


def test_two_state_directories_cannot_apply_to_one_cluster_at_once(tmp_path: Path) -> None:
    """The service's /var/lib/homelab and a shell user's ~/.local/state/homelab: one apply at a time per cluster."""
    cluster = f"lock-{tmp_path.name}"
    with apply_lock(tmp_path / "service", cluster):
        with pytest.raises(LockHeld, match=f"another homelab apply to cluster '{cluster}' is running"):
            Executor(cluster, {}, tmp_path / "shell").apply(Plan(cluster, "x", (), ()))
        Executor("another-cluster", {}, tmp_path / "shell").apply(Plan("another-cluster", "x", (), ()))
    Executor(cluster, {}, tmp_path / "shell").apply(Plan(cluster, "x", (), ()))  # released


def test_a_plan_made_before_another_apply_is_refused_once_the_lock_is_held(tmp_path: Path) -> None:
    """Two applies planned at the same time: the second finds the cluster changed when it holds the lock, and
    runs nothing of its out-of-date plan."""
    lab = Lab()
    spec = spec_of()
    wiring = Wiring(connect=lambda s: lab.connect, health_check=lab._healthy, port_holder=lambda a, p: None)
    with Session(spec, wiring, tmp_path / "a") as first, Session(spec, wiring, tmp_path / "b") as late:
        plan_a, plan_b = first.prepare(), late.prepare()
        assert plan_a.plan.steps and plan_a.plan == plan_b.plan
        assert first.executor(plan_a).apply(plan_a.plan).ok
        containers = dict(lab.engines["box"].containers)
        with pytest.raises(StalePlan, match="the cluster changed since this plan was made"):
            late.executor(plan_b).apply(plan_b.plan)
        assert lab.engines["box"].containers == containers  # nothing of the stale plan ran
        fresh = late.prepare()
        assert fresh.plan.empty and late.executor(fresh).apply(fresh.plan).ok
