"""`homelab reconcile` against a real dockerd with real llama.cpp containers (issue 5's "done when").

One private Docker engine (tests/support/dockerd.py), images assembled locally
(no pulls), two small real GGUFs copied into a volume and served by
llama-server containers on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest

from controller.core.state import LABEL_CLUSTER
from controller.drivers.docker import DockerEngine
from controller.effects.apply import EVENTS_FILE, Executor
from controller.effects.engine import CachingConnect, Prepared
from solver.place import SolveParams
from specs import parse_spec
from specs.model import ClusterSpec, Node
from tests.support import dockerd as dockerd_support
from tests.support.ports import free_port_range
from tests.support.wiring import Wired, prepare

SPEC = """\
cluster: {{name: {cluster}}}
nodes:
  - name: box
    tier: remote
    address: 127.0.0.1
    docker: {{endpoint: "{endpoint}", gpu_access: none}}
    gpus: [{{index: 0, name: declared 8 GiB card, vram: 8GiB}}]
    ram: 16GiB
    llamacpp:
      image: "{image}"
      helper_image: "{helper}"
      ports: {base}-{top}
      bind_address: 127.0.0.1
      threads: 1
      volume: hl-models
      health_timeout: 60s
models:
  - name: alpha
    runtime: llamacpp
    source: {{gguf: {models}/alpha.gguf}}
    context: {ctx_alpha}
  - name: beta
    runtime: llamacpp
    source: {{gguf: {models}/beta.gguf}}
    context: 512
"""


class World:
    def __init__(
        self, daemon: dockerd_support.Dockerd, client: docker.DockerClient, tmp: Path, fields: dict[str, object]
    ) -> None:
        self.daemon = daemon
        self.client = client
        self.tmp = tmp
        self.fields = fields

    def spec(self, *, ctx_alpha: int = 512, without_beta: bool = False) -> ClusterSpec:
        text = SPEC.format(**self.fields, ctx_alpha=ctx_alpha)
        if without_beta:
            text = text.split("  - name: beta")[0]
        return parse_spec(text, "cluster.yaml").spec

    def connect(self, node: Node) -> DockerEngine:
        return DockerEngine(node, str(self.fields["cluster"]), poll_interval=0.05)

    def prepare(self, spec: ClusterSpec) -> tuple[Prepared, CachingConnect]:
        connect = CachingConnect(self.connect)
        return prepare(spec, connect, SolveParams(time_limit=5, workers=1)), connect

    def apply(self, spec: ClusterSpec) -> Prepared:
        prepared, connect = self.prepare(spec)
        ex = Executor(spec.cluster.name, dict(connect.opened), self.tmp / "state", health_timeout={"box": 60})
        result = ex.apply(prepared.plan)
        assert result.ok, result.summary()
        return prepared

    def container_id(self, name: str) -> str:
        return str(self.client.containers.get(name).id)


@pytest.fixture
def world(
    dockerd: dockerd_support.Dockerd,
    docker_client: docker.DockerClient,
    busybox_image: str,
    llamacpp_image: str,
    small_gguf: Path,
    cluster: str,
    tmp_path: Path,
) -> Iterator[World]:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(small_gguf, models / "alpha.gguf")
    shutil.copy(small_gguf, models / "beta.gguf")
    base = free_port_range(8)
    fields: dict[str, object] = {
        "cluster": cluster,
        "endpoint": dockerd.url,
        "image": llamacpp_image,
        "helper": busybox_image,
        "base": base,
        "top": base + 7,
        "models": models,
    }
    yield World(dockerd, docker_client, tmp_path, fields)
    for container in docker_client.containers.list(all=True):
        container.remove(force=True)
    for volume in docker_client.volumes.list():
        volume.remove(force=True)


def served_models(port: int) -> list[str]:
    r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5, trust_env=False)
    r.raise_for_status()
    return [m["id"] for m in r.json()["data"]]


def test_reconcile_builds_converges_and_heals(world: World) -> None:
    spec = world.spec()
    base = int(world.fields["base"])  # type: ignore[call-overload]
    # A container someone else started: never touched.
    world.client.containers.run(str(world.fields["helper"]), ["sleep", "600"], name="someone-elses", detach=True)

    # 1. From an empty engine: volume, copies (verified), containers one after another.
    first = world.apply(spec)
    kinds = [s.kind.value for s in first.plan.steps]
    assert kinds == [
        "create-volume",
        "copy-file",
        "copy-file",
        "run-container",
        "wait-healthy",
        "run-container",
        "wait-healthy",
    ]
    assert served_models(base) == ["alpha"]
    assert served_models(base + 1) == ["beta"]
    events = [json.loads(line) for line in (world.tmp / "state" / EVENTS_FILE).read_text().splitlines()]
    order = [(e["event"], e.get("step"), e.get("name")) for e in events if e["event"].startswith("step-")]
    # beta's container was created only after alpha answered /health.
    assert order.index(("step-done", "wait-healthy", "homelab-alpha")) < order.index(
        ("step-started", "run-container", "homelab-beta")
    )
    files = world.connect(spec.nodes[0]).list_files("hl-models")
    assert sorted((f.name, f.size) for f in files) == [
        ("alpha.gguf", (Path(str(world.fields["models"])) / "alpha.gguf").stat().st_size),
        ("beta.gguf", (Path(str(world.fields["models"])) / "beta.gguf").stat().st_size),
    ]

    # 2. Nothing left to do.
    again, _ = world.prepare(spec)
    assert again.plan.in_sync, again.plan.changes

    # 3. One model's context changes: only its container is replaced.
    beta_id = world.container_id("homelab-beta")
    alpha_id = world.container_id("homelab-alpha")
    changed = world.apply(world.spec(ctx_alpha=1024))
    assert [(c.action.value, c.name, c.reason) for c in changed.plan.changes] == [
        ("replace", "homelab-alpha", "config changed: context 512 → 1024")
    ]
    assert world.container_id("homelab-beta") == beta_id
    assert world.container_id("homelab-alpha") != alpha_id
    assert served_models(base) == ["alpha"]

    # 4. A container killed by hand is started again.
    world.client.containers.get("homelab-beta").kill()
    healed = world.apply(world.spec(ctx_alpha=1024))
    assert [(c.action.value, c.name) for c in healed.plan.changes] == [("update", "homelab-beta")]
    assert served_models(base + 1) == ["beta"]

    # 5. A model removed from the spec: only its container goes, and its file no model uses any more.
    removed = world.apply(world.spec(ctx_alpha=1024, without_beta=True))
    assert [(c.action.value, c.name, c.reason) for c in removed.plan.changes] == [
        ("delete", "hl-models/beta.gguf", "no model in the spec uses it"),
        ("delete", "homelab-beta", "not in spec"),
    ]
    with DockerEngine(world.spec().node("box"), world.spec().cluster.name) as engine:
        assert [f.name for f in engine.list_files("hl-models")] == ["alpha.gguf"]
    names = {c.name for c in world.client.containers.list(all=True)}
    assert names == {"homelab-alpha", "someone-elses"}
    someone = world.client.containers.get("someone-elses")
    assert someone.status == "running" and LABEL_CLUSTER not in someone.labels


def test_stale_saved_plan_is_refused(world: World, monkeypatch: pytest.MonkeyPatch, wired: Wired) -> None:
    spec_text = SPEC.format(**world.fields, ctx_alpha=512)
    (world.tmp / "cluster.yaml").write_text(spec_text)
    monkeypatch.chdir(world.tmp)
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(world.tmp / "state"))
    wired.set(connect=lambda spec: world.connect)
    r = wired.invoke(["reconcile", "--dry-run", "--out", "plan.json"])
    assert r.exit_code == 2, r.output
    world.client.volumes.create("hl-models", labels={LABEL_CLUSTER: str(world.fields["cluster"])})
    r = wired.invoke(["reconcile", "--plan", "plan.json", "--yes"])
    assert r.exit_code == 1
    assert "the cluster changed since this plan was made" in r.stderr
    assert [c.name for c in world.client.containers.list(all=True)] == []
    # A fresh plan, applied through the command line: copies report their bytes.
    r = wired.invoke(["reconcile", "--yes"])
    assert r.exit_code == 0, r.output
    assert "box: copying alpha.gguf: " in r.stdout and "(100%)" in r.stdout
    assert r.stdout.rstrip().endswith("Apply complete: 6 steps.")
    r = wired.invoke(["reconcile", "--dry-run"])
    assert r.exit_code == 0 and "No changes. The cluster matches the spec." in r.stdout


def test_health_of_real_llama_cpp_containers_and_engine(world: World) -> None:
    from controller.effects.health import Status, Verdict, check

    spec = world.spec()
    prepared = world.apply(spec)
    report = check(spec, prepared.desired)
    got = {p.endpoint.name: p.status for p in report.probes}
    assert got == {"box/docker": Status.UP, "box/llamacpp/alpha": Status.UP, "box/llamacpp/beta": Status.UP}
    assert report.verdict is Verdict.HEALTHY
    world.client.containers.get("homelab-beta").kill()
    report = check(spec, prepared.desired)
    beta = next(p for p in report.probes if p.endpoint.name == "box/llamacpp/beta")
    assert beta.status is Status.DOWN and beta.error == "Connection refused"
    assert report.verdict is Verdict.DEGRADED
    assert (
        report.reason
        == "remote DEGRADED (box/llamacpp/beta: Connection refused); requests fall back to the other tiers"
    )
    world.daemon.stop()
    try:
        report = check(spec, prepared.desired)
        docker = next(p for p in report.probes if p.endpoint.name == "box/docker")
        assert docker.status is Status.DOWN and docker.error == "No such file or directory"
    finally:
        world.daemon.start()
