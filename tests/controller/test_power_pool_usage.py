"""A node with a swap pool can sleep (issue 28 item 4): last use is read from what the router offers.

The stand-in router answers as controller/drivers/llamacpp.py documents llama-server in router mode: `GET /slots`
is 400 (`model name is missing from the request`), `GET /v1/models` lists each member with `status.value`, and
`GET /slots?model=ALIAS` is that member's slots."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from controller.core.state import ClusterState, ContainerConfig, ContainerState, NodeState, PoolMember, health_url
from controller.effects.power import IdleTracker, probe_usage, sleep_due
from tests.controller.test_power import spec
from tests.support.ports import free_port


class Router:
    def __init__(self) -> None:
        self.states: dict[str, str] = {"od-a": "loaded", "od-b": "unloaded"}
        self.tasks: dict[str, int] = {"od-a": 1}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                u = urlparse(self.path)
                model = parse_qs(u.query).get("model", [""])[0]
                body: Any
                if u.path == "/v1/models":
                    code = 200
                    body = {"data": [{"id": a, "status": {"value": s}} for a, s in outer.states.items()]}
                elif u.path == "/slots" and not model:
                    code = 400
                    body = {"error": {"code": 400, "message": "model name is missing from the request"}}
                elif u.path == "/slots" and outer.states.get(model) == "loaded":
                    code = 200
                    body = [{"id": 0, "id_task": outer.tasks.get(model, 0), "is_processing": False}]
                else:
                    code, body = 404, {"error": {"code": 404, "message": "not found"}}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def router() -> Iterator[Router]:
    r = Router()
    yield r
    r.close()


def _desired(port: int) -> ClusterState:
    members = tuple(PoolMember(m, m, f"{m}.gguf", 4096, 10, "f16", 60.0) for m in ("od-a", "od-b"))
    config = ContainerConfig("llama:test", (), "", 0, 10, port, "", "", (0,), "nvidia", "models", members=members)
    c = ContainerState("homelab-pool-box-gpu0", "box", "", 0, config, config.digest(), health_url("127.0.0.1", port))
    return ClusterState("lab", {"box": NodeState(node="box", containers=(c,))})


def test_a_pool_node_becomes_idle_and_a_use_is_seen(router: Router) -> None:
    node = spec().node("box")
    desired = _desired(router.port)
    t = IdleTracker()
    first = asyncio.run(probe_usage(node, desired))
    assert first.error is None, first.error  # the router's 400 on /slots is not "a server did not answer"
    assert t.update("box", first, 100.0) == 0.0
    idle = t.update("box", asyncio.run(probe_usage(node, desired)), 200.0)
    assert idle == 100.0
    assert sleep_due(node, idle, False)[0]  # sleep_after 30 s: idleness is known, so the node may sleep
    router.tasks["od-a"] = 2  # od-a served a request
    assert t.update("box", asyncio.run(probe_usage(node, desired)), 210.0) == 0.0
    router.states["od-b"] = "loading"  # a request for od-b is loading it: in flight
    busy = asyncio.run(probe_usage(node, desired))
    assert busy.in_flight and t.update("box", busy, 220.0) == 0.0
    router.states["od-b"] = "sleeping"
    assert t.update("box", asyncio.run(probe_usage(node, desired)), 230.0) == 0.0  # a change of state: a use
    assert t.update("box", asyncio.run(probe_usage(node, desired)), 260.0) == 30.0


def test_a_router_that_does_not_answer_leaves_idleness_unknown() -> None:
    port = free_port()
    usage = asyncio.run(probe_usage(spec().node("box"), _desired(port)))
    assert usage.error is not None and usage.error.startswith(f"http://127.0.0.1:{port}: ")
