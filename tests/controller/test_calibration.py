"""Calibration from what ran, with the fake Docker driver: measured host memory above the estimate is kept in the
state directory, reserved by the next plan, shown by `place`, the plan and `status`; a changed config discards it;
an unchanged cluster still plans nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from controller.core.state import ClusterState, NodeState
from controller.drivers.base import NodeUnreachable
from controller.drivers.docker import stats_memory
from controller.drivers.fake import FakeDockerNode
from controller.effects import calibration
from controller.effects.engine import Session
from controller.effects.observe import observe
from solver.estimate import LayerCurve
from solver.profiles import MEASURED_MARGIN, Measured, calibrate_curve
from specs import parse_spec
from specs.enums import LayerOrder
from specs.model import ClusterSpec, Node
from tests.controller.test_reconcile import SOURCES, SPEC
from tests.support.wiring import Wired

GIB = 1 << 30


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wired: Wired) -> dict[str, FakeDockerNode]:
    fakes = {n: FakeDockerNode(n, images={"llama:test"}, source_files=dict(SOURCES)) for n in ("box", "spare")}

    def factory(spec: ClusterSpec) -> object:
        return lambda node: fakes.setdefault(node.name, FakeDockerNode(node.name, reachable=False))

    wired.set(connect=factory)
    wired.set(gpu_probe=lambda nodes: {})
    wired.set(health_check=lambda url, timeout, cancelled, serves: None)
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "cluster.yaml").write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    return fakes


def _record(tmp_path: Path, wired: Wired) -> None:
    """What a run of `homelab watch` does besides planning: measure the running containers and keep it."""
    spec = parse_spec((tmp_path / "cluster.yaml").read_text(), "cluster.yaml").spec
    with Session(spec, wired.wiring, tmp_path / "state") as session:
        session.record(session.prepare())


def _measured(tmp_path: Path) -> list[dict[str, object]]:
    data = json.loads((tmp_path / "state" / calibration.MEASURED_FILE).read_text())
    return list(data["measurements"])


def test_measured_above_estimate_is_reserved_shown_and_causes_no_churn(
    engines: dict[str, FakeDockerNode], tmp_path: Path, wired: Wired
) -> None:
    code, _, err = wired.run("reconcile", "--yes")
    assert code == 0, err
    assert not (tmp_path / "state" / calibration.MEASURED_FILE).exists()  # the fake reported no memory yet
    engines["spare"].memory["homelab-tiny"] = 3 * GIB  # declared 1 GiB: the estimate at ngl 0 is 1 GiB
    code, out, err = wired.run("status")
    assert code == 0, err
    assert "    RAM estimate 1.00 GiB, measured 3.00 GiB (+2.00 GiB, +200%)" in out
    assert not (tmp_path / "state" / calibration.MEASURED_FILE).exists()  # shown, not kept: a status is inert
    _record(tmp_path, wired)
    [kept] = _measured(tmp_path)
    hash_now = engines["spare"].containers["homelab-tiny"].config_hash
    assert kept["node"] == "spare" and kept["model"] == "tiny" and kept["config_hash"] == hash_now
    assert kept["ram_bytes"] == 3 * GIB
    code, out, _ = wired.run("status", "--json")
    [tiny] = json.loads(out)["nodes"]["spare"]["containers"]
    assert tiny["measured"]["ram_estimate_bytes"] == GIB and tiny["measured"]["ram_measured_bytes"] == 3 * GIB
    assert tiny["measured"]["ram_measured_minus_estimate_bytes"] == 2 * GIB
    reserved = 3 * GIB * (1 + MEASURED_MARGIN)
    line = f"tiny: measured 3.00 GiB RAM on spare, estimate 1.00 GiB (reserved {reserved / GIB:.2f} GiB)"
    # The next plan reserves it, and plans nothing: the model still fits where it runs.
    code, out, _ = wired.run("reconcile", "--dry-run")
    assert code == 0, out
    assert f"  spare CPU: tiny ({reserved / GIB:.1f} GiB RAM)" in out
    assert f"  {line}" in out
    assert "No changes. The cluster matches the spec." in out
    code, out, _ = wired.run("place")
    assert code == 0
    assert f"Measured:\n  {line}\n" in out
    assert f"tiny on spare: {reserved / GIB:.1f} GiB RAM" in out
    # A smaller figure later does not lower the peak kept.
    engines["spare"].memory["homelab-tiny"] = 2 * GIB
    _record(tmp_path, wired)
    assert _measured(tmp_path)[0]["ram_bytes"] == 3 * GIB


def test_a_changed_config_discards_the_measurement(
    engines: dict[str, FakeDockerNode], tmp_path: Path, wired: Wired
) -> None:
    assert wired.run("reconcile", "--yes")[0] == 0
    engines["spare"].memory["homelab-tiny"] = 3 * GIB
    _record(tmp_path, wired)
    assert len(_measured(tmp_path)) == 1
    (tmp_path / "cluster.yaml").write_text(
        SPEC.replace(
            "placement: {node: spare, cpu_only: true}", "context: 2048\n    placement: {node: spare, cpu_only: true}"
        )
    )
    code, out, _ = wired.run("reconcile", "--dry-run")
    assert code == 2
    assert "measured" not in out and "  spare CPU: tiny (1.0 GiB RAM)" in out
    code, out, _ = wired.run("place")
    assert "Measured:" not in out and "tiny on spare: 1.0 GiB RAM" in out
    del engines["spare"].memory["homelab-tiny"]  # the new container has not been measured yet
    assert wired.run("reconcile", "--yes")[0] == 0
    assert _measured(tmp_path) == []  # the old container is gone: its measurement with it


TWO_CPU = """\
cluster: {name: lab}
nodes:
  - name: spare
    tier: cpu
    address: 127.0.0.2
    docker: {endpoint: "unix:///tmp/none2.sock"}
    ram: 16GiB
    llamacpp: {image: "llama:test", ports: 3100-3109}
models:
  - name: tiny
    runtime: llamacpp
    source: {gguf: /srv/models/tiny.gguf}
    placement: {node: spare, cpu_only: true}
    memory: {vram: 4GiB, layers: 12}
  - name: coder
    runtime: llamacpp
    priority: 10
    source: {gguf: /srv/models/coder.gguf}
    placement: {node: spare, cpu_only: true}
    memory: {vram: 4GiB, layers: 28}
"""


def test_a_model_measured_over_what_its_node_has_left_is_a_plan_warning(
    engines: dict[str, FakeDockerNode], tmp_path: Path, wired: Wired
) -> None:
    (tmp_path / "cluster.yaml").write_text(TWO_CPU)
    assert wired.run("reconcile", "--yes")[0] == 0
    assert set(engines["spare"].containers) == {"homelab-tiny", "homelab-coder"}
    engines["spare"].memory["homelab-tiny"] = 13 * GIB  # 13 + 4 GiB > 16 GiB: it endangers the node's RAM
    _record(tmp_path, wired)
    code, out, err = wired.run("reconcile", "--dry-run")
    assert code == 2
    assert (
        "warning: tiny: measured 13.00 GiB RAM on spare, estimate 4.00 GiB (reserved 13.65 GiB):"
        " coder (running beside it) fits nowhere now and is not placed"
    ) in err
    assert "  - container homelab-coder  (not placed: see the warnings)" in out
    # Measured beyond the whole node: the measured model itself no longer fits.
    engines["spare"].memory["homelab-tiny"] = 17 * GIB
    _record(tmp_path, wired)
    code, out, err = wired.run("reconcile", "--dry-run")
    assert "tiny: measured 17.00 GiB RAM on spare, estimate 4.00 GiB (reserved 17.85 GiB): it fits nowhere now" in err


def test_merge_keeps_peaks_and_drops_replaced_containers() -> None:
    m = calibration.Measurement("n", "a", 0, "homelab-a", "h1", "s", 0, (), 100, None)
    observed = ClusterState("lab", {"n": NodeState("n")})
    assert calibration.merge([m], [], observed) == []  # n answered and runs no such container
    assert calibration.merge([m], [], ClusterState("lab", {})) == [m]  # n not observed: kept
    later = calibration.Measurement("n", "a", 0, "homelab-a", "h1", "s", 0, (), 80, None)
    assert calibration.merge([], [m, later], observed)[0].ram_bytes == 100


def test_stats_memory_subtracts_inactive_file_cache() -> None:
    assert stats_memory({"memory_stats": {"usage": 1000, "stats": {"inactive_file": 300}}}) == 700
    assert stats_memory({"memory_stats": {"usage": 1000, "stats": {"total_inactive_file": 100}}}) == 900
    assert stats_memory({"memory_stats": {}}) is None


def test_calibrate_curve_raises_vram_and_ram_at_the_measured_offload_only() -> None:
    curve = LayerCurve(2, LayerOrder.OUTPUT_FIRST, (10, 10), (10, 10), (0, 50, 60), (200, 150, 140))
    raised, note = calibrate_curve(curve, Measured("n", 3, (0,), ram_bytes=100, vram_bytes=200))
    assert (note.vram_estimate, note.ram_estimate) == (80, 120)  # full offload: 60 + 2 blocks; RAM 140 - 2 blocks
    assert raised.vram(3) == 210 and raised.ram(3) == 120  # 200 · 1.05; the RAM measured below its estimate
    assert raised.vram(2) == curve.vram(2) and raised.ram(0) == curve.ram(0)  # other regimes unchanged
    assert "measured 0.0 MiB VRAM on n:0" in note.text("m")
    # A split replica's VRAM is not one GPU's: left alone.
    _, split = calibrate_curve(curve, Measured("n", 3, (0, 1), vram_bytes=200))
    assert not split.raised


class _Flaky(FakeDockerNode):
    """A fake engine whose first stats requests fail or give nothing, as a container started a moment ago can."""

    def __init__(self, fake: FakeDockerNode, answers: list[int | Exception | None]) -> None:
        self.__dict__.update(fake.__dict__)
        self.answers = answers

    def container_memory(self, name: str) -> int | None:
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        return super().container_memory(name)


@pytest.mark.parametrize("first", [None, NodeUnreachable("spare: connection refused")])
def test_after_an_apply_a_container_that_gave_no_figure_is_asked_again(
    engines: dict[str, FakeDockerNode], tmp_path: Path, wired: Wired, first: Exception | None
) -> None:
    code, _, err = wired.run("reconcile", "--yes")
    assert code == 0, err
    spec = parse_spec(SPEC, "cluster.yaml").spec
    engines["spare"].memory["homelab-tiny"] = 3 * GIB
    engines["box"].memory.update({"homelab-chat": GIB, "homelab-coder": GIB})
    flaky = _Flaky(engines["spare"], [first, None])
    pauses: list[float] = []

    def connect(node: Node) -> FakeDockerNode:
        return flaky if node.name == "spare" else engines[node.name]

    observed = observe(spec, connect)
    # One sample (every observe but the one after an apply): nothing yet, nothing kept.
    assert [m.ram_bytes for m in calibration.measure(spec, observed, connect, None) if m.node == "spare"] == []
    flaky.answers = [first, None]
    got = calibration.measure(spec, observed, connect, None, attempts=3, pause=pauses.append)
    assert [(m.model, m.ram_bytes) for m in got if m.node == "spare"] == [("tiny", 3 * GIB)]
    assert pauses == [1.0, 1.0]  # one pause per pass, not per container
    flaky.answers = [None, None, None]
    pauses.clear()
    assert [m for m in calibration.measure(spec, observed, connect, None, attempts=3, pause=pauses.append)] == [
        m for m in got if m.node == "box"
    ]
    assert pauses == [1.0, 1.0]  # given up after the third pass


def test_with_gpu_access_none_a_model_that_stays_is_not_said_to_move(
    engines: dict[str, FakeDockerNode], tmp_path: Path, wired: Wired
) -> None:
    """Containers on a `gpu_access: none` node are given no GPU device, so where they run says no GPU: that is
    not a move to the GPU the placement counts their layers on, and no plan may warn that they "no longer fit"."""
    spec = SPEC.replace(
        'docker: {endpoint: "unix:///tmp/none.sock"}', 'docker: {endpoint: "unix:///tmp/none.sock", gpu_access: none}'
    )
    assert spec != SPEC
    (tmp_path / "cluster.yaml").write_text(spec)
    code, _, err = wired.run("reconcile", "--yes")
    assert code == 0, err
    assert engines["box"].containers["homelab-chat"].config.gpus == ()  # type: ignore[union-attr]
    engines["box"].memory["homelab-chat"] = 3 * GIB  # above its RAM estimate; the node has room for it
    _record(tmp_path, wired)
    code, out, err = wired.run("reconcile", "--dry-run")
    assert "chat: measured 3.00 GiB RAM on box" in out
    assert "no longer fits" not in err and "warning: chat" not in err, err
    assert code == 0 and "No changes. The cluster matches the spec." in out, out


def _files(state: Path) -> dict[str, str]:
    return {
        str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest() for p in state.rglob("*") if p.is_file()
    }


def test_planning_is_inert(engines: dict[str, FakeDockerNode], tmp_path: Path, wired: Wired) -> None:
    """`reconcile --dry-run`, `place` and `status` leave the state directory byte-identical (a measurement to take
    and a sha256 to cache are there to write, and are not written)."""
    assert wired.run("reconcile", "--yes")[0] == 0
    engines["spare"].memory["homelab-tiny"] = 3 * GIB
    _record(tmp_path, wired)
    engines["spare"].memory["homelab-tiny"] = 5 * GIB  # a new peak a plan could keep
    before = _files(tmp_path / "state")
    assert "measured.json" in before
    for args in (("reconcile", "--dry-run"), ("place",), ("status",), ("status", "--json")):
        wired.run(*args)
        assert _files(tmp_path / "state") == before, args
