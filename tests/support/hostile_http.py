"""A hostile HTTP server on loopback, for tests of what homelab does with a node's answer.

Each route (method, path) answers a `Reply` given by the test: any status and body, a body that never
ends or trickles one chunk at a time, a declared length that is a lie. It is no real server's stand-in: it
answers whatever a broken node, a reverse proxy's error page or an attacker could. Routes not given
answer `default` (404 when there is none). Every request is recorded in `seen` as (method, path).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.ports import free_port


@dataclass(frozen=True)
class Reply:
    body: bytes | Callable[[], Iterator[bytes]] = b""
    """The body; a callable gives chunks, written as they come (no Content-Length unless `length`)."""
    status: int = 200
    content_type: str = "application/json"
    length: int | None = None
    """A Content-Length to declare (a lie, when it differs from the body's)."""
    delay: float = 0.0
    """Seconds to wait before each chunk of a callable body."""


def trickle(data: bytes, every: float) -> Callable[[], Iterator[bytes]]:
    """The body sent one byte at a time, one every `every` seconds."""

    def chunks() -> Iterator[bytes]:
        for i in range(len(data)):
            time.sleep(every)
            yield data[i : i + 1]

    return chunks


def endless(prefix: bytes, chunk: bytes, total: int) -> Callable[[], Iterator[bytes]]:
    """`prefix` then `chunk` repeated to about `total` bytes, made as it is sent (never held in memory)."""

    def chunks() -> Iterator[bytes]:
        yield prefix
        for _ in range(total // len(chunk)):
            yield chunk

    return chunks


@dataclass
class HostileServer:
    routes: dict[tuple[str, str], Reply] = field(default_factory=dict)
    default: Reply | None = None
    keep_alive: bool = False
    """HTTP/1.1 with keep-alive for bodies of known length (a fast server); else one request per connection."""
    seen: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self.stopping = threading.Event()
        self.port = self.port or free_port()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if self.keep_alive else "HTTP/1.0"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                path = self.path.split("?")[0]
                server.seen.append((self.command, path))
                reply = server.routes.get((self.command, path), server.default) or Reply(b"404 page not found", 404)
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    if isinstance(reply.body, bytes):
                        self.send_header("Content-Length", str(reply.length or len(reply.body)))
                        self.end_headers()
                        self.wfile.write(reply.body)
                        return
                    if reply.length is not None:
                        self.send_header("Content-Length", str(reply.length))
                    self.send_header("Connection", "close")
                    self.close_connection = True
                    self.end_headers()
                    for chunk in reply.body():
                        if server.stopping.is_set():
                            return
                        if reply.delay:
                            time.sleep(reply.delay)
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            do_GET = do_POST = do_DELETE = answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self, routes: Mapping[tuple[str, str], Reply], default: Reply | None = None) -> None:
        """Answer these routes from now on."""
        self.routes = dict(routes)
        self.default = default

    def __enter__(self) -> HostileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
