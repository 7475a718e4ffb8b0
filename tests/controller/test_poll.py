"""controller.drivers.poll.poll_200 against a real HTTP server on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from controller.drivers.poll import poll_200
from controller.effects.apply import StepFailed, wait_healthy
from tests.support.ports import free_port


class Server:
    def __init__(self, codes: list[int]) -> None:
        self.codes = codes
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code = outer.codes[min(outer.hits, len(outer.codes) - 1)]
                outer.hits += 1
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/health"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    s = Server(list(request.param))
    yield s
    s.close()


@pytest.mark.parametrize("server", [[503, 503, 200]], indirect=True)
def test_answers_after_loading(server: Server) -> None:
    assert poll_200(server.url, 10, every=0.01) is None
    assert server.hits == 3


@pytest.mark.parametrize("server", [[503]], indirect=True)
def test_the_last_reason_when_it_never_answers(server: Server) -> None:
    reason = poll_200(server.url, 0.1, every=0.01, describe=lambda code: f"loading ({code})")
    assert reason == "loading (503)" and server.hits >= 2
    with pytest.raises(StepFailed, match=r"did not answer 200 within 0.1s \(last: loading \(503\)\)"):
        wait_healthy(server.url, 0.1, lambda: False)


@pytest.mark.parametrize("server", [[500]], indirect=True)
def test_between_stops_the_wait(server: Server) -> None:
    calls: list[int] = []

    def stop() -> None:
        calls.append(1)
        raise RuntimeError("the process exited")

    with pytest.raises(RuntimeError, match="exited"):
        poll_200(server.url, 10, every=0.01, between=stop)
    assert calls == [1] and server.hits == 1
    with pytest.raises(StepFailed, match="cancelled"):
        wait_healthy(server.url, 10, lambda: True)


def test_a_refused_connection_is_a_reason_or_done() -> None:
    url = f"http://127.0.0.1:{free_port()}/health"
    assert poll_200(url, 0.1, every=0.01) == "ConnectError"
    assert poll_200(url, 10, every=0.01, error_is_ok=lambda exc: isinstance(exc, httpx.ConnectError)) is None
