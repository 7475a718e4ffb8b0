"""Health proves identity (issue 28 item 3): the server answering on a container's port is the one homelab
started (its `--alias`, or a router's members, on `/v1/models`); a squatter on the port fails the wait."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from controller.core.diff import PortConflict
from controller.drivers.fake import FakeDockerNode
from controller.drivers.llamacpp import identity
from controller.effects.apply import Executor, StepFailed, wait_healthy
from controller.effects.engine import CachingConnect, Session, Wiring, port_holder
from controller.effects.health import Endpoint as HealthEndpoint
from controller.effects.health import Status, probe_all
from solver.place import SolveParams
from specs import parse_spec
from specs.errors import HomelabError
from specs.model import Node
from tests.support.ports import free_port
from tests.support.wiring import prepare


class Squatter:
    """A server on 127.0.0.1 that answers `/health` 200 and lists `ids` on `/v1/models` (None: 404 there)."""

    def __init__(self, ids: list[str] | None, server: str = "SquatHTTP/1.0") -> None:
        outer = self
        self.hits: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            server_version = server
            sys_version = ""

            def do_GET(self) -> None:
                outer.hits.append(self.path)
                if self.path == "/health":
                    code, body = 200, b'{"status":"ok"}'
                elif self.path == "/v1/models" and ids is not None:
                    code, body = 200, json.dumps({"object": "list", "data": [{"id": i} for i in ids]}).encode()
                else:
                    code, body = 404, b"not found"
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/health"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def squatter(request: pytest.FixtureRequest) -> Iterator[Squatter]:
    s = Squatter(request.param)
    yield s
    s.close()


@pytest.mark.parametrize("squatter", [["chatter"]], indirect=True)
def test_the_container_just_started_passes(squatter: Squatter) -> None:
    wait_healthy(squatter.url, 5, lambda: False, ("chatter",))
    assert squatter.hits == ["/health", "/v1/models"]
    assert identity(squatter.url.removesuffix("/health"), ["chatter"], 2) is None


@pytest.mark.parametrize("squatter", [["generalist"]], indirect=True)
def test_a_squatter_fails_the_wait_at_once_naming_what_answered(squatter: Squatter) -> None:
    with pytest.raises(StepFailed) as err:
        wait_healthy(squatter.url, 300, lambda: False, ("chatter",))
    text = str(err.value)
    assert "not the container just started" in text and "generalist" in text and "SquatHTTP" in text
    assert "chatter" in text and "\n" not in text


@pytest.mark.parametrize("squatter", [None], indirect=True)
def test_a_server_that_is_not_llama_server_fails_the_wait(squatter: Squatter) -> None:
    with pytest.raises(StepFailed, match=r"/v1/models answered HTTP 404 \(Server: SquatHTTP/1.0\)"):
        wait_healthy(squatter.url, 300, lambda: False, ("chatter",))


@pytest.mark.parametrize("squatter", [["od-a", "od-b"]], indirect=True)
def test_a_router_is_proven_by_all_its_members(squatter: Squatter) -> None:
    base = squatter.url.removesuffix("/health")
    assert identity(base, ["od-a", "od-b"], 2) is None
    wrong = identity(base, ["od-a", "od-c"], 2)
    assert wrong is not None and "not od-c" in wrong


SPEC = """\
cluster: {{name: lab}}
nodes:
  - name: box
    tier: cpu
    address: 127.0.0.1
    docker: {{endpoint: "unix:///tmp/none.sock"}}
    ram: 16GiB
    llamacpp: {{image: "llama:test", ports: {port}-{port}}}
models:
  - name: chatter
    runtime: llamacpp
    source: {{gguf: /srv/models/chatter.gguf}}
    placement: {{node: box, cpu_only: true}}
    memory: {{vram: 1GiB, layers: 12}}
"""


@pytest.mark.parametrize("squatter", [["someone-else"]], indirect=True)
def test_an_apply_whose_port_is_squatted_fails_not_complete(squatter: Squatter, tmp_path: Path) -> None:
    """The fake engine 'starts' the container (nothing runs); the squatter answers its port: the apply fails."""
    spec = parse_spec(SPEC.format(port=squatter.port), "cluster.yaml").spec
    box = FakeDockerNode("box", images={"llama:test"}, source_files={"/srv/models/chatter.gguf": 1000})

    def connect(node: Node) -> FakeDockerNode:
        return box

    plan = prepare(spec, CachingConnect(connect), SolveParams(time_limit=5, workers=1)).plan
    result = Executor(spec.cluster.name, {"box": box}, tmp_path, health_timeout={"box": 300}).apply(plan)
    assert not result.ok
    o = result.outcomes["box"]
    assert o.failed is not None and o.failed.kind.value == "wait-healthy"
    assert o.error is not None and "someone-else" in o.error and "not chatter" in o.error


@pytest.mark.parametrize("squatter", [["generalist"]], indirect=True)
def test_a_health_probe_of_a_squatted_port_is_down_naming_what_answered(squatter: Squatter) -> None:
    ours = HealthEndpoint("box/llamacpp/chatter", "cpu", "llamacpp", squatter.url, 2.0, "box", "chatter", "chatter")
    theirs = HealthEndpoint("box/llamacpp/gen", "cpu", "llamacpp", squatter.url, 2.0, "box", "gen", "generalist")
    down, up = asyncio.run(probe_all([ours, theirs], 1.0))
    assert down.status is Status.DOWN and down.error is not None
    assert "another server holds the port" in down.error and "generalist" in down.error and "SquatHTTP" in down.error
    assert up.status is Status.UP and up.error is None


# --------------------------------------------------------------------------- a port held on the node: plan error


@pytest.mark.parametrize("squatter", [["someone-else"]], indirect=True)
def test_a_port_held_by_a_host_process_is_a_plan_error_naming_it(squatter: Squatter, tmp_path: Path) -> None:
    """The real `port_holder` against a server on the port the plan would start chatter on (node on loopback)."""
    spec = parse_spec(SPEC.format(port=squatter.port), "cluster.yaml").spec
    box = FakeDockerNode("box", images={"llama:test"}, source_files={"/srv/models/chatter.gguf": 1000})
    wiring = Wiring(connect=lambda s: lambda node: box, gpu_probe=lambda nodes: {}, port_holder=port_holder)
    with Session(spec, wiring, tmp_path) as session, pytest.raises(PortConflict) as err:
        session.prepare()
    text = str(err.value)
    assert f"127.0.0.1:{squatter.port}" in text and "homelab-chatter" in text and "SquatHTTP" in text
    assert "\n" not in text
    assert isinstance(err.value, HomelabError)  # the CLI's one `error:` line, exit 1 (`controller.cli.main`)


def test_a_free_port_or_our_own_running_container_is_no_conflict(tmp_path: Path) -> None:
    port = free_port()
    spec = parse_spec(SPEC.format(port=port), "cluster.yaml").spec
    box = FakeDockerNode("box", images={"llama:test"}, source_files={"/srv/models/chatter.gguf": 1000})
    asked: list[tuple[str, int]] = []

    def holder(address: str, p: int) -> str | None:
        asked.append((address, p))
        return "something"

    wiring = Wiring(connect=lambda s: lambda node: box, gpu_probe=lambda nodes: {}, port_holder=port_holder)
    with Session(spec, wiring, tmp_path) as session:
        plan = session.prepare().plan
    Executor(spec.cluster.name, {"box": box}, tmp_path, health_check=lambda *a: None).apply(plan)
    # chatter runs now (homelab's own): its port is not asked about again
    with Session(spec, replace(wiring, port_holder=holder), tmp_path) as session:
        assert session.prepare().plan.steps == ()
    assert asked == []


def test_a_stopped_managed_container_on_a_foreign_containers_port_is_a_conflict(tmp_path: Path) -> None:
    """The Docker case: an unlabelled container publishing the port of homelab's exited container."""
    spec = parse_spec(SPEC.format(port=3000), "cluster.yaml").spec
    box = FakeDockerNode("box", images={"llama:test"}, source_files={"/srv/models/chatter.gguf": 1000})
    plan = prepare(spec, CachingConnect(lambda n: box), SolveParams(time_limit=5, workers=1)).plan
    Executor(spec.cluster.name, {"box": box}, tmp_path, health_check=lambda *a: None).apply(plan)
    box.containers["homelab-chatter"] = replace(box.containers["homelab-chatter"], status="exited", exit_code=1)
    box.inspected["squat"] = {
        "Name": "/squat",
        "Config": {"Labels": {}, "Cmd": []},
        "HostConfig": {"NetworkMode": "bridge", "PortBindings": {"3000/tcp": [{"HostPort": "3000"}]}},
    }
    with pytest.raises(PortConflict, match=r"which container squat .*not managed by homelab.* holds"):
        prepare(spec, CachingConnect(lambda n: box), SolveParams(time_limit=5, workers=1))
