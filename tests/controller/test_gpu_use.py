"""Memory held by other processes, smaller or missing GPUs, and planned vs actual VRAM — with fakes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from controller.commands import reconcile as reconcile_cmd
from controller.core.state import ClusterState
from controller.drivers.gpu import GpuInfo, GpuProcess, NodeGpus
from controller.effects.gpu_use import FOREIGN_MARGIN_MIN_BYTES, assess, with_margin
from solver.place import SolveParams
from specs.model import ClusterSpec, Node
from tests.controller.test_reconcile import SPEC, Lab, spec_of
from tests.support.wiring import Wired, prepare

GIB = 2**30
MIB = 2**20


def box(
    processes: Sequence[GpuProcess] | None = (),
    *,
    used0: int = 0,
    total0: int = 24 * GIB,
    gpus: Sequence[int] = (0, 1),
) -> NodeGpus:
    all_gpus = {
        0: GpuInfo(0, "NVIDIA GeForce RTX 3090", "GPU-a", total0, used0, total0 - used0, "550.1"),
        1: GpuInfo(1, "NVIDIA GeForce RTX 3060", "GPU-b", 12 * GIB, 0, 12 * GIB, "550.1"),
    }
    return NodeGpus("box", tuple(all_gpus[i] for i in gpus), None if processes is None else tuple(processes), 64 * GIB)


class Probe:
    """A fake `discover_gpus`: fixed reports, and the nodes it was asked about."""

    def __init__(self, reports: Mapping[str, NodeGpus]) -> None:
        self.reports = dict(reports)
        self.asked: list[list[str]] = []

    def __call__(self, nodes: Sequence[Node]) -> Mapping[str, NodeGpus]:
        self.asked.append([n.name for n in nodes])
        return {n.name: self.reports[n.name] for n in nodes if n.name in self.reports}


PYTHON = GpuProcess(422, "python3", 18 * GIB, "GPU-a")


def test_margin() -> None:
    assert with_margin(0) == 0
    assert with_margin(10 * MIB) == 0  # noise
    assert with_margin(1 * GIB) == 1 * GIB + FOREIGN_MARGIN_MIN_BYTES
    assert with_margin(20 * GIB) == 21 * GIB


def test_foreign_use_changes_the_placement_and_the_plan_says_so() -> None:
    lab = Lab()
    spec = spec_of()
    before = lab.prepare(spec)
    chat = next(a for a in before.placement.assignments if a.model == "chat")
    assert chat.gpu_layers == chat.layers  # fits whole on the empty 24 GiB GPU

    probe = Probe({"box": box([PYTHON], used0=18 * GIB)})
    after = prepare(spec, lab.connect, SolveParams(time_limit=5), gpu_probe=probe)
    assert probe.asked == [["box"]]  # spare has no GPU in the spec: not probed
    assert after.gpus is not None
    assert after.gpus.foreign_vram == {("box", 0): with_margin(18 * GIB)}
    gpu0 = next(g for g in after.placement.gpus if g.node == "box" and g.index == 0)
    assert gpu0.capacity_bytes == 24 * GIB - with_margin(18 * GIB)
    chat = next(a for a in after.placement.assignments if a.model == "chat")
    assert 0 < chat.gpu_layers < chat.layers  # partly offloaded now
    lines = reconcile_cmd.placement_summary(after)
    assert (
        "  GPU 0 on box: 18.0 GiB held by other processes (python3 422: 18.0 GiB); 18.9 GiB kept free for them" in lines
    )
    assert after.gpus.warnings == ()


def test_homelab_containers_and_ollama_are_not_foreign(tmp_path: Path) -> None:
    lab = Lab()
    spec = spec_of()
    lab.apply(spec, tmp_path)
    lab.engines["box"].pids = {"homelab-chat": {1000, 1001}}
    mine = GpuProcess(1001, "llama-server", 10 * GIB, "GPU-a")
    report = box([mine, PYTHON], used0=28 * GIB + 512 * MIB)  # 512 MiB used by no listed process (a desktop)
    observed = lab.prepare(spec).observed
    reality = assess(spec, {"box": report}, {"box": {"homelab-chat": frozenset({1000, 1001})}}, observed)
    (finding, _) = reality.findings
    assert finding.foreign_processes == (PYTHON,)
    assert finding.foreign_bytes == 18 * GIB + 512 * MIB  # the unlisted use counts: every managed process was seen
    assert "not listed: 0.5 GiB" in reality.notes[0]

    # homelab's container not among the processes (Docker Desktop hides them): unlisted use may be ours
    hidden = assess(
        spec, {"box": box([PYTHON], used0=28 * GIB)}, {"box": {"homelab-chat": frozenset({1000})}}, observed
    )
    assert hidden.findings[0].foreign_bytes == 18 * GIB

    with_ollama = spec_of(
        SPEC.replace(
            '    llamacpp: {image: "llama:test", ports: 3000-3009, volume: models}',
            '    llamacpp: {image: "llama:test", ports: 3000-3009, volume: models}\n'
            '    ollama: {url: "http://127.0.0.1:11434"}',
        )
    )
    ollama = GpuProcess(7, "/usr/bin/ollama", 4 * GIB, "GPU-a")
    r = assess(with_ollama, {"box": box([ollama], used0=4 * GIB)}, {}, ClusterState("lab", {}))
    assert r.findings[0].foreign_bytes == 0 and r.notes == ()


def test_smaller_and_missing_gpus_are_warnings_and_planned_as_they_are() -> None:
    lab = Lab()
    spec = spec_of()
    probe = Probe({"box": box(total0=23 * GIB, gpus=(0,))})
    prepared = prepare(spec, lab.connect, SolveParams(time_limit=5), gpu_probe=probe)
    assert prepared.gpus is not None
    assert prepared.gpus.warnings == (
        "GPU 0 on box: the spec says 24.0 GiB, the node has 23.0 GiB (NVIDIA GeForce RTX 3090): planning with"
        " 23.0 GiB (`homelab discover --write` updates the spec)",
        "GPU 1 on box: in the spec (RTX 3060, 12.0 GiB) but not on the node (no GPU with index 1):"
        " planning it with no memory",
    )
    caps = {(g.node, g.index): g.capacity_bytes for g in prepared.placement.gpus}
    assert caps == {("box", 0): 23 * GIB, ("box", 1): 0}
    coder = next(a for a in prepared.placement.assignments if a.model == "coder")
    assert coder.gpus == ()  # no memory on its pinned GPU: CPU only (cpu_offload allows it)


def test_discovery_failure_is_a_warning_and_the_spec_figures_are_used() -> None:
    lab = Lab()
    spec = spec_of()
    probe = Probe({"box": NodeGpus("box", error="node box: nvidia-smi not found")})
    prepared = prepare(spec, lab.connect, SolveParams(time_limit=5), gpu_probe=probe)
    assert prepared.gpus is not None and prepared.gpus.foreign_vram == {}
    assert prepared.gpus.warnings == (
        "node box: nvidia-smi not found; memory held by other processes on its GPUs is unknown:"
        " planning with the spec's figures",
    )
    assert {g.capacity_bytes for g in prepared.placement.gpus} == {24 * GIB, 12 * GIB}


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_lab(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wired: Wired) -> Lab:
    lab = Lab()

    def factory(spec: ClusterSpec) -> object:
        return lab.connect

    wired.set(connect=factory)
    wired.set(health_check=lambda url, timeout, cancelled, serves: None)
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "cluster.yaml").write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    return lab


def test_reconcile_dry_run_shows_foreign_use_and_warnings(
    cli_lab: Lab, monkeypatch: pytest.MonkeyPatch, wired: Wired
) -> None:
    wired.set(gpu_probe=Probe({"box": box([PYTHON], used0=18 * GIB, gpus=(0,))}))
    code, out, err = wired.run("reconcile", "--dry-run")
    assert code == 2
    assert "  GPU 0 on box: 18.0 GiB held by other processes (python3 422: 18.0 GiB)" in out
    assert "warning: GPU 1 on box: in the spec (RTX 3060, 12.0 GiB) but not on the node" in err
    code, out, _ = wired.run("reconcile", "--dry-run", "--json")
    data = json.loads(out)
    assert data["gpus"]["gpus"][0]["foreign_bytes"] == 18 * GIB


def test_status_planned_vs_actual(cli_lab: Lab, monkeypatch: pytest.MonkeyPatch, wired: Wired) -> None:
    wired.set(gpu_probe=Probe({}))
    code, _, err = wired.run("reconcile", "--yes")
    assert code == 0, err
    cli_lab.engines["box"].pids = {"homelab-chat": {1000, 1001}, "homelab-coder": {2000}}
    procs = [
        GpuProcess(1001, "llama-server", 11 * GIB + 512 * MIB, "GPU-a"),  # 15% over its 10 GiB
        GpuProcess(2000, "llama-server", 5 * GIB, "GPU-b"),  # as planned
    ]
    wired.set(gpu_probe=Probe({"box": box(procs, used0=11 * GIB + 512 * MIB)}))
    code, out, err = wired.run("status")
    assert code == 0, err
    assert (
        "  homelab-chat  running  GPU 0  port 3000, ngl 33, ctx 4096  VRAM planned 10.0 GiB, actual 11.5 GiB"
        " (+15%, OVER PLAN)" in out
    )
    assert (
        "  homelab-coder  running  GPU 1  port 3001, ngl 29, ctx 4096  VRAM planned 5.0 GiB, actual 5.0 GiB (+0%)"
        in out
    )
    code, out, _ = wired.run("status", "--json")
    chat = next(c for c in json.loads(out)["nodes"]["box"]["containers"] if c["name"] == "homelab-chat")
    assert chat["vram_planned_bytes"] == 10 * GIB
    assert chat["vram_actual_bytes"] == 11 * GIB + 512 * MIB
    assert chat["vram_over_plan"] is True
