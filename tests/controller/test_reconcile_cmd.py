"""`homelab reconcile` and `homelab status` end to end through the CLI, with the fake Docker driver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.drivers.fake import FakeDockerNode
from controller.drivers.fake_ollama import FakeOllamaNode
from specs.model import ClusterSpec, Node
from tests.controller.test_reconcile import SOURCES, SPEC
from tests.support.wiring import Wired


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wired: Wired) -> dict[str, FakeDockerNode]:
    fakes = {n: FakeDockerNode(n, images={"llama:test"}, source_files=dict(SOURCES)) for n in ("box", "spare")}

    def factory(spec: ClusterSpec) -> object:
        def connect(node: Node) -> FakeDockerNode:
            fake = fakes.setdefault(node.name, FakeDockerNode(node.name, reachable=False))
            return fake

        return connect

    wired.set(connect=factory)
    wired.set(gpu_probe=lambda nodes: {})  # no GPU discovery here
    wired.set(health_check=lambda url, timeout, cancelled, serves: None)
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "cluster.yaml").write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    return fakes


def test_dry_run_apply_dry_run(engines: dict[str, FakeDockerNode], wired: Wired) -> None:
    code, out, _ = wired.run("reconcile", "--dry-run")
    assert code == 2
    assert "  + container homelab-chat  (not running on this node)" in out
    assert out.endswith("Plan: 8 to add, 0 to change, 0 to destroy.\n")
    assert "box GPU 0: 10.0 of 24.0 GiB (42%): chat 33/33" in out
    assert engines["box"].containers == {}  # a dry run changes nothing
    code, out, err = wired.run("reconcile", "--yes")
    assert code == 0, err
    assert "Apply complete: 11 steps." in out
    assert set(engines["box"].containers) == {"homelab-chat", "homelab-coder"}
    code, out, _ = wired.run("reconcile", "--dry-run")
    assert code == 0
    assert "No changes. The cluster matches the spec." in out
    code, out, _ = wired.run("status")
    assert "  homelab-chat  running  GPU 0  port 3000, ngl 33, ctx 4096" in out


def test_without_yes_and_without_a_terminal_nothing_is_applied(
    engines: dict[str, FakeDockerNode], wired: Wired
) -> None:
    code, _, err = wired.run("reconcile")
    assert code == 1
    assert "error: not applying without confirmation" in err
    assert engines["box"].containers == {}


def test_saved_plan_is_applied_only_while_current(
    engines: dict[str, FakeDockerNode], tmp_path: Path, wired: Wired
) -> None:
    code, _, _ = wired.run("reconcile", "--dry-run", "--out", "plan.json")
    assert code == 2
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["summary"] == {"add": 8, "change": 0, "destroy": 0}
    engines["box"].foreign.add("someone-elses")  # the world moves on
    code, _, err = wired.run("reconcile", "--plan", "plan.json", "--yes")
    assert code == 1
    assert "the cluster changed since this plan was made" in err
    assert engines["box"].containers == {}
    engines["box"].foreign.clear()
    code, _, err = wired.run("reconcile", "--plan", "plan.json", "--yes")
    assert code == 0, err
    assert set(engines["box"].containers) == {"homelab-chat", "homelab-coder"}


def test_bad_saved_plan(engines: dict[str, FakeDockerNode], tmp_path: Path, wired: Wired) -> None:
    (tmp_path / "plan.json").write_text("{not json")
    code, _, err = wired.run("reconcile", "--plan", "plan.json", "--yes")
    assert code == 1 and err.startswith("error: plan.json: not a readable homelab plan")
    code, _, err = wired.run("reconcile", "--plan", "missing.json", "--yes")
    assert code == 1 and err.startswith("error: missing.json: no such file")


def test_example_spec_with_no_node_reachable(
    engines: dict[str, FakeDockerNode], examples_dir: Path, wired: Wired
) -> None:
    code, out, _ = wired.run("reconcile", "--dry-run", "-f", str(examples_dir / "homelab.yaml"))
    assert code == 2
    assert "node workstation: UNREACHABLE (workstation: connection refused)" in out
    assert "  + container homelab-qwen2.5-coder-7b  (not running on this node)" in out
    assert "workstation GPU 0: 20.9 of 23.0 GiB" in out
    assert out.endswith("No changes on the nodes that answered.\nPlan: 0 to add, 0 to change, 0 to destroy.\n")


def test_minimal_example_with_its_ollama_down_names_the_node_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wired: Wired
) -> None:
    """The README's smallest cluster with Ollama down: its model has no estimate (nothing placed), yet the
    node is reported unreachable and the dry run exits 2, never "the cluster matches the spec"."""
    down = FakeOllamaNode("desktop", reachable=False)
    wired.set(ollama=lambda node: down, gpu_probe=lambda nodes: {})
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    minimal = Path(__file__).resolve().parents[2] / "examples" / "minimal.yaml"
    code, out, _ = wired.run("reconcile", "--dry-run", "-f", str(minimal))
    assert code == 2
    assert "No changes. The cluster matches the spec." not in out
    assert "node desktop: UNREACHABLE (Ollama on desktop does not answer (ConnectError))" in out
    assert "  nothing is planned here until it answers\n" in out
    assert "No changes on the nodes that answered." in out


def test_a_missing_lock_directory_is_blamed_on_the_lock_directory(
    engines: dict[str, FakeDockerNode], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wired: Wired
) -> None:
    missing = tmp_path / "no-such-lock-dir"
    monkeypatch.setenv("HOMELAB_LOCK_DIR", str(missing))
    code, _, err = wired.run("reconcile", "--yes")
    assert code == 1
    assert f"error: lock directory ($HOMELAB_LOCK_DIR) {missing}: cannot open the lock file homelab-" in err
    assert "No such file or directory" in err
    assert "state directory" not in err
    assert engines["box"].containers == {}
