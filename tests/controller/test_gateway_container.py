"""`gateway.mode: container` against the shipped fakes: what is planned, in what order, and where the key goes.

The proxy itself is a tiny HTTP server here that answers `/health/liveliness`;
tests/integration/test_gateway_container_real.py runs the real one in a real container.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from controller.core.plan import Plan, render_text
from controller.core.state import GATEWAY_CONTAINER, GATEWAY_MOUNT, GATEWAY_VOLUME, LABEL_CLUSTER, LABEL_ROLE
from controller.drivers.base import DriverError
from controller.drivers.fake import FakeDockerNode
from controller.drivers.litellm import ContainerGateway
from controller.effects.apply import Executor
from controller.effects.engine import CachingConnect, Prepared, gateways
from solver.place import SolveParams
from specs import parse_spec
from specs.model import ClusterSpec
from tests.support.wiring import prepare

KEY = "sk-unit-" + "9f3c1a7e5b2d4c6f"

SPEC = """\
cluster: {{name: lab}}
secrets: {{master: "env:HL_UNIT_GW_KEY"}}
nodes:
  - name: box
    tier: remote
    address: 127.0.0.1
    docker: {{endpoint: "unix:///nowhere.sock", gpu_access: none}}
    gpus: [{{index: 0, name: RTX 3090, vram: 24GiB}}]
    ram: 64GiB
    llamacpp: {{image: "llama:test", ports: 3000-3009, volume: models}}
models:
  - name: coder
    runtime: llamacpp
    source: {{gguf: /srv/models/coder.gguf}}
    categories: [code]
    placement: {{node: box}}
    memory: {{vram: 5GiB, layers: 28}}
gateway: {{node: box, mode: container, image: "{image}", host: 127.0.0.1, port: {port}, master_key: secret:master}}
"""


class Liveliness(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health/liveliness" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def proxy_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Liveliness)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


class Lab:
    def __init__(self, port: int, tmp: Path) -> None:
        self.port = port
        self.tmp = tmp
        self.docker = FakeDockerNode(
            "box", images={"llama:test", "litellm:1", "litellm:2"}, source_files={"/srv/models/coder.gguf": 5_000}
        )

    def spec(self, image: str = "litellm:1") -> ClusterSpec:
        return parse_spec(SPEC.format(image=image, port=self.port), "cluster.yaml").spec

    def prepare(self, spec: ClusterSpec) -> Prepared:
        connect = CachingConnect(lambda node: self.docker)
        return prepare(
            spec, connect, SolveParams(time_limit=5, workers=1), gateway=gateways(spec, connect, self.tmp / "state")
        )

    def apply(self, spec: ClusterSpec) -> Plan:
        prepared = self.prepare(spec)
        assert prepared.desired.gateway is not None
        ex = Executor(
            spec.cluster.name,
            {"box": self.docker},
            self.tmp / "state",
            health_check=lambda url, timeout, cancelled, serves: None,
            gateway=ContainerGateway(prepared.desired.gateway, self.docker, spec.cluster.name),
            gateway_timeout=5,
        )
        result = ex.apply(prepared.plan)
        assert result.ok, result.summary()
        return prepared.plan


@pytest.fixture
def lab(proxy_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Lab:
    monkeypatch.setenv("HL_UNIT_GW_KEY", KEY)
    return Lab(proxy_port, tmp_path)


def steps(plan: Plan) -> list[tuple[str, str]]:
    return [(s.node, s.kind.value) for s in plan.steps]


def test_first_reconcile_runs_the_backends_then_writes_and_starts_the_proxy(lab: Lab) -> None:
    spec = lab.spec()
    plan = lab.apply(spec)
    assert steps(plan) == [
        ("box", "create-volume"),
        ("box", "copy-file"),
        ("box", "run-container"),
        ("box", "wait-healthy"),
        ("", "gateway-write"),
        ("", "gateway-restart"),
        ("", "gateway-wait"),
    ]
    path = f"box:{GATEWAY_VOLUME}/config.yaml"
    assert [c.name for c in plan.changes if c.kind == "gateway"] == [path]
    config = lab.docker.text_volumes[GATEWAY_VOLUME]["config.yaml"]
    assert "master_key: os.environ/HL_UNIT_GW_KEY\n" in config and KEY not in config
    service, status, env = lab.docker.services[GATEWAY_CONTAINER]
    assert status == "running" and service.image == "litellm:1" and service.volume == GATEWAY_VOLUME
    assert service.command == (
        "--config",
        f"{GATEWAY_MOUNT}/config.yaml",
        "--host",
        "127.0.0.1",
        "--port",
        str(lab.port),
    )
    assert env == {"HL_UNIT_GW_KEY": KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    assert KEY not in repr(service) and KEY not in plan.dumps() and KEY not in render_text(plan)
    events = (lab.tmp / "state" / "events.jsonl").read_text()
    assert KEY not in events
    # The gateway's container and volume are not model containers or model volumes.
    containers, _ = lab.docker.list_containers("lab")
    assert [c.name for c in containers] == ["homelab-coder"]
    assert lab.prepare(spec).plan.in_sync


def test_a_config_change_rewrites_and_restarts_keeping_the_previous_file(lab: Lab) -> None:
    lab.apply(lab.spec())
    first = lab.docker.text_volumes[GATEWAY_VOLUME]["config.yaml"]
    text = SPEC.replace("categories: [code]", "categories: [code, chat]").format(image="litellm:1", port=lab.port)
    spec = parse_spec(text, "cluster.yaml").spec
    plan = lab.prepare(spec).plan
    assert steps(plan) == [("", "gateway-write"), ("", "gateway-restart"), ("", "gateway-wait")]
    (change,) = plan.changes
    assert change.reason == "config changed: write it, restart the proxy"
    assert "+  - model_name: expert/chat\n" in change.detail
    lab.apply(spec)
    assert lab.docker.text_volumes[GATEWAY_VOLUME]["config.yaml.bak"] == first
    assert lab.docker.calls.count(("run_service", GATEWAY_CONTAINER)) == 2
    assert lab.prepare(spec).plan.in_sync


def test_a_new_image_re_creates_the_container_and_a_stopped_one_is_restarted(lab: Lab) -> None:
    lab.apply(lab.spec())
    plan = lab.prepare(lab.spec(image="litellm:2")).plan
    assert steps(plan) == [("", "gateway-restart"), ("", "gateway-wait")]
    assert "re-create it" in plan.changes[0].reason
    lab.apply(lab.spec(image="litellm:2"))
    assert lab.docker.services[GATEWAY_CONTAINER][0].image == "litellm:2"

    service, _, env = lab.docker.services[GATEWAY_CONTAINER]
    lab.docker.services[GATEWAY_CONTAINER] = (service, "exited", env)
    plan = lab.prepare(lab.spec(image="litellm:2")).plan
    assert [c.reason for c in plan.changes] == ["the proxy does not answer /health/liveliness: restart it"]
    lab.apply(lab.spec(image="litellm:2"))
    assert lab.docker.services[GATEWAY_CONTAINER][1] == "running"


def test_an_unreachable_gateway_node_defers_the_gateway(lab: Lab) -> None:
    lab.docker.reachable = False
    prepared = lab.prepare(lab.spec())
    assert prepared.plan.steps == () and "box" in prepared.plan.unreachable
    assert any(c.kind == "gateway" for c in prepared.plan.deferred)


def test_a_missing_key_fails_the_restart_without_naming_a_value(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = lab.spec()
    desired = lab.prepare(spec).desired.gateway
    assert desired is not None
    monkeypatch.delenv("HL_UNIT_GW_KEY")
    gw = ContainerGateway(desired, lab.docker, "lab")
    with pytest.raises(DriverError, match="environment variable HL_UNIT_GW_KEY is not set"):
        gw.restart(desired)
    assert GATEWAY_CONTAINER not in lab.docker.services
    # A container of that name that is not homelab's is never replaced.
    lab.docker.foreign.add(GATEWAY_CONTAINER)
    monkeypatch.setenv("HL_UNIT_GW_KEY", KEY)
    with pytest.raises(DriverError, match="not homelab's"):
        gw.restart(replace(desired))
    labels = {LABEL_CLUSTER: "lab", LABEL_ROLE: "gateway"}
    lab.docker.write_volume_files(GATEWAY_VOLUME, [("config.yaml", "a: 1\n")], labels)
    assert gw.read_config() is not None


def test_a_gateway_container_the_spec_no_longer_runs_is_removed_first(lab: Lab) -> None:
    lab.apply(lab.spec())
    assert GATEWAY_CONTAINER in lab.docker.services
    without = parse_spec(SPEC.format(image="litellm:1", port=lab.port).split("gateway:")[0], "cluster.yaml").spec
    plan = lab.prepare(without).plan
    assert [(c.action.value, c.kind, c.name, c.reason) for c in plan.changes] == [
        ("delete", "service", GATEWAY_CONTAINER, "the gateway no longer runs on this node")
    ]
    assert steps(plan) == [("box", "remove-service")]
    assert f"- service {GATEWAY_CONTAINER}" in render_text(plan)
    Executor(without.cluster.name, {"box": lab.docker}, lab.tmp / "state", health_check=lambda u, t, c, s: None).apply(
        plan
    )
    assert GATEWAY_CONTAINER not in lab.docker.services
    assert GATEWAY_VOLUME in lab.docker.text_volumes  # its config (and .bak) stay: nothing is lost
    assert lab.prepare(without).plan.empty
