"""The read-only HTTP endpoint of `homelab watch` and `homelab ui`.

    GET /             the status page (`controller.core.status_page.render_page`), complete without JavaScript
    GET /api/status   the status dict as JSON; `?view=html` adds `html`, the page's main part, for its refresh
    GET /metrics      Prometheus metrics (when a registry is given: `homelab watch`)
    anything else     GET: 404; any other method: 405 — no endpoint changes anything

The status is built by a callable (`controller.effects.status_api.collect` bound to a spec) at most once
per `max_age` seconds, whoever asks: the page, its refresh and a script share one probe of the cluster.
A failing build answers 500 with one line and leaves the server up. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from controller.core.status_page import REFRESH_S, SCRIPT, api_json, render_page

StatusFn = Callable[[], Mapping[str, Any]]

_SCRIPT_HASH = base64.b64encode(hashlib.sha256((SCRIPT % REFRESH_S).encode()).digest()).decode()
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; connect-src 'self'; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""Nothing but this page's own inline script and style, and fetches back to this server."""


class CachedStatus:
    """`fn()` at most once per `max_age` seconds; concurrent callers wait for the one build in progress."""

    def __init__(self, fn: StatusFn, max_age: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.fn, self.max_age, self.clock = fn, max_age, clock
        self._lock = threading.Lock()
        self._at: float | None = None
        self._value: Mapping[str, Any] = {}

    def __call__(self) -> Mapping[str, Any]:
        with self._lock:
            if self._at is None or self.clock() - self._at >= self.max_age:
                self._value = self.fn()
                self._at = self.clock()
            return self._value


class StatusServer:
    def __init__(
        self,
        status: StatusFn | None,
        registry: CollectorRegistry | None = None,
        *,
        max_age: float = 2.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.status = CachedStatus(status, max_age) if status is not None else None
        self.registry = registry
        self.on_error = on_error
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Listen (port 0: any free one) and answer in a background thread; the port bound."""
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="homelab-http", daemon=True)
        self._thread.start()
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


def _handler(owner: StatusServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "homelab"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str, extra: Mapping[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _text(self, code: int, text: str, extra: Mapping[str, str] | None = None) -> None:
            self._send(code, (text + "\n").encode(), "text/plain; charset=utf-8", extra)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/metrics" and owner.registry is not None:
                self._send(200, generate_latest(owner.registry), CONTENT_TYPE_LATEST)
                return
            if url.path not in ("/", "/api/status") or owner.status is None:
                self._text(404, f"not found: {url.path} (try /, /api/status{', /metrics' if owner.registry else ''})")
                return
            try:
                status = owner.status()
            except Exception as exc:  # one line, and the server stays up for the next refresh
                line = f"status unavailable: {type(exc).__name__}: {exc}".splitlines()[0]
                if owner.on_error is not None:
                    owner.on_error(line)
                if url.path == "/":
                    self._text(500, line)
                else:
                    self._send(500, json.dumps({"error": line}).encode(), "application/json")
                return
            if url.path == "/":
                page = render_page(status).encode()
                self._send(200, page, "text/html; charset=utf-8", {"Content-Security-Policy": CSP})
                return
            with_html = parse_qs(url.query).get("view") == ["html"]
            self._send(200, api_json(status, with_html).encode(), "application/json")

        def _refuse(self) -> None:
            self._text(405, f"{self.command}: this server is read-only (GET only)", {"Allow": "GET"})

        def __getattr__(self, name: str) -> Any:
            if name.startswith("do_"):  # every method but GET, known to http.server or not
                return self._refuse
            raise AttributeError(name)

    return Handler
