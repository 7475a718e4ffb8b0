"""A stand-in for an Ollama server, for tests: no Ollama can be installed on the test machine.

This is NOT Ollama. It implements the part of Ollama's REST API that homelab
uses, following Ollama's docs/api.md for the 0.6 line (the JSON form of
`/api/create` with `model`, `from` and `parameters`, introduced in 0.5.5;
`model` as the name field everywhere):

- `GET /api/version`, `GET /api/tags`, `GET /api/ps`;
- `POST /api/show` — `details` (with `parent_model` for a derived model),
  `parameters` as Ollama prints them, `modelfile`, `template`, and `model_info`
  with the GGUF metadata keys (arrays left empty, as without `verbose`);
  404 `{"error": "model 'x' not found"}` for an unknown model;
- `POST /api/pull` — NDJSON: `pulling manifest`, `pulling <digest>` lines with
  `digest`, `total`, `completed`, then `verifying sha256 digest`, `writing
  manifest`, `success`. The "registry" is a directory of GGUF files (one per
  tag). An unknown tag streams `{"error": "pull model manifest: file does not
  exist"}` after `pulling manifest`, as Ollama does; `stream: false` gives one
  object. A model appears in /api/tags only once its pull succeeded;
- `POST /api/create` — NDJSON (`using existing layer …`, `creating new layer …`,
  `writing manifest`, `success`); the new model exists only after success;
- `DELETE /api/delete` — 200 with an empty body, 404 for an unknown model;
- `POST /api/generate` and `POST /api/chat` — with no prompt / no messages, load
  the model (`done_reason: load`, kept for `keep_alive`: -1 forever, 0 unloads);
  otherwise forwarded to a real llama-server (every model is answered by the one
  llama-server this stand-in is given: the point is that a request through the
  gateway reaches a real model): the messages through its chat template
  (`/apply-template`), then a plain `/completion`, as Ollama's runner does.
  Streaming answers come as one content line and a final `done` line.

Faults for tests: `drop_pull` (tags whose pull stream is cut half way: the
connection closes without the end of the chunked body) and `fail_create`.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from solver.gguf import read_header

API_VERSION = "0.6.2"
"""The Ollama version whose API this stand-in follows (reported by /api/version)."""
CHUNK = 1 << 20


def full_name(name: str) -> str:
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


@dataclass
class StandinModel:
    name: str
    gguf: Path
    digest: str
    size: int
    parent_model: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    modified_at: str = field(default_factory=_now)


class OllamaStandin:
    """Serve the stand-in on `host`:`port` (default 127.0.0.1, a free port) in a background thread; use as a
    context manager."""

    def __init__(
        self,
        registry: dict[str, Path],
        llama_url: str | None = None,
        llama_options: dict[str, Any] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.registry = {full_name(k): Path(v) for k, v in registry.items()}
        self.llama_url = llama_url
        self.llama_options = dict(llama_options or {})
        """Extra fields for llama-server's /completion (e.g. a logit_bias that keeps a synthetic model's
        byte tokens out of its answers, which llama-server refuses as malformed output)."""
        self.models: dict[str, StandinModel] = {}
        self.loaded: dict[str, float] = {}
        """name → expiry (monotonic seconds; inf: forever)."""
        self.drop_pull: set[str] = set()
        self.fail_create: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        standin = self

        class Handler(_Handler):
            server_state = standin

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="ollama-standin", daemon=True
        )

    def __enter__(self) -> OllamaStandin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def add_local(self, name: str) -> None:
        """A model "pulled by hand" before the test: present without a pull."""
        name = full_name(name)
        path = self.registry[name]
        self.models[name] = StandinModel(name, path, _file_digest(path), path.stat().st_size)

    # ------------------------------------------------------------------ views

    def details(self, m: StandinModel) -> dict[str, Any]:
        md = read_header(m.gguf).metadata
        arch = str(md.get("general.architecture", ""))
        ft = md.get("general.file_type")
        quant = {0: "F32", 1: "F16", 7: "Q8_0", 15: "Q4_K_M"}.get(ft if isinstance(ft, int) else -1, "unknown")
        return {
            "parent_model": m.parent_model,
            "format": "gguf",
            "family": arch,
            "families": [arch],
            "parameter_size": f"{m.size / 1e6:.0f}M",
            "quantization_level": quant,
        }

    def model_info(self, m: StandinModel) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in read_header(m.gguf).metadata.items():
            if isinstance(value, (list, tuple)):
                out[key] = [] if key.startswith("tokenizer.") else list(value)
            elif isinstance(value, (str, int, float, bool)):
                out[key] = value
        return out

    def tag_entry(self, m: StandinModel) -> dict[str, Any]:
        return {
            "name": m.name,
            "model": m.name,
            "modified_at": m.modified_at,
            "size": m.size,
            "digest": m.digest,
            "details": self.details(m),
        }

    def parameters_text(self, m: StandinModel) -> str:
        return "\n".join(f"{k:<30} {v}" for k, v in sorted(m.parameters.items()))


class _Handler(BaseHTTPRequestHandler):
    server_state: OllamaStandin
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ plumbing

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return {}
        data = json.loads(raw)
        return data if isinstance(data, dict) else {}

    def _json(self, status: int, data: Any) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _stream(self, events: Iterator[dict[str, Any]], stream: bool) -> None:
        """NDJSON in chunked encoding (or the last object alone when stream is false)."""
        if not stream:
            last: dict[str, Any] = {}
            for event in events:
                last = event
                if "error" in event:
                    self._error(500, event["error"])
                    return
            self._json(200, last)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in events:
            if event.get("__drop__"):
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # cut: no terminating chunk
                return
            line = (json.dumps(event) + "\n").encode()
            self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # ------------------------------------------------------------------ routes

    def do_GET(self) -> None:
        st = self.server_state
        st.requests.append(("GET", self.path))
        if self.path == "/api/version":
            self._json(200, {"version": API_VERSION})
        elif self.path == "/api/tags":
            with st.lock:
                models = [st.tag_entry(m) for m in st.models.values()]
            self._json(200, {"models": models})
        elif self.path == "/api/ps":
            now = time.monotonic()
            with st.lock:
                for name, until in list(st.loaded.items()):
                    if until <= now or name not in st.models:
                        del st.loaded[name]
                running = []
                for name, until in st.loaded.items():
                    m = st.models[name]
                    left = 365 * 24 * 3600 * 100 if until == float("inf") else until - now
                    entry = st.tag_entry(m)
                    entry["expires_at"] = (datetime.now(UTC) + timedelta(seconds=left)).isoformat()
                    entry["size_vram"] = 0
                    running.append(entry)
            self._json(200, {"models": running})
        elif self.path in ("/", ""):
            payload = b"Ollama is running"
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        else:
            self._empty(404)

    def do_DELETE(self) -> None:
        st = self.server_state
        st.requests.append(("DELETE", self.path))
        if self.path != "/api/delete":
            self._empty(404)
            return
        name = full_name(str(self._body().get("model") or self._body().get("name") or ""))
        with st.lock:
            if name not in st.models:
                self._error(404, f"model '{name}' not found")
                return
            del st.models[name]
            st.loaded.pop(name, None)
        self._empty(200)

    def do_POST(self) -> None:
        st = self.server_state
        st.requests.append(("POST", self.path))
        try:
            body = self._body()
        except ValueError:
            self._error(400, "invalid JSON")
            return
        route = {
            "/api/show": self._show,
            "/api/pull": self._pull,
            "/api/create": self._create,
            "/api/generate": self._generate,
            "/api/chat": self._chat,
        }.get(self.path)
        if route is None:
            self._empty(404)
            return
        route(body)

    def _show(self, body: dict[str, Any]) -> None:
        st = self.server_state
        name = full_name(str(body.get("model") or body.get("name") or ""))
        m = st.models.get(name)
        if m is None:
            self._error(404, f"model '{name}' not found")
            return
        params = st.parameters_text(m)
        modelfile = f"# Modelfile generated by the Ollama stand-in\nFROM {m.parent_model or m.gguf}\n" + "".join(
            f"PARAMETER {k} {v}\n" for k, v in sorted(m.parameters.items())
        )
        self._json(
            200,
            {
                "modelfile": modelfile,
                "parameters": params,
                "template": "{{ .Prompt }}",
                "details": st.details(m),
                "model_info": st.model_info(m),
                "modified_at": m.modified_at,
            },
        )

    def _pull(self, body: dict[str, Any]) -> None:
        st = self.server_state
        name = full_name(str(body.get("model") or body.get("name") or ""))
        stream = body.get("stream", True) is not False

        def events() -> Iterator[dict[str, Any]]:
            yield {"status": "pulling manifest"}
            path = st.registry.get(name)
            if path is None:
                yield {"error": "pull model manifest: file does not exist"}
                return
            total = path.stat().st_size
            h = hashlib.sha256()
            done = 0
            # The digest is announced before the download: compute it first, as the manifest has it.
            digest = "sha256:" + _file_digest(path)
            with path.open("rb") as f:
                while block := f.read(max(1, total // 4)):
                    h.update(block)
                    done += len(block)
                    yield {"status": f"pulling {digest[7:19]}", "digest": digest, "total": total, "completed": done}
                    if name in st.drop_pull and done * 2 >= total:
                        yield {"__drop__": True}
                        return
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            with st.lock:
                st.models[name] = StandinModel(name, path, h.hexdigest(), total)
            yield {"status": "success"}

        self._stream(events(), stream)

    def _create(self, body: dict[str, Any]) -> None:
        st = self.server_state
        name = full_name(str(body.get("model") or ""))
        base = full_name(str(body.get("from") or ""))
        params = body.get("parameters") or {}
        stream = body.get("stream", True) is not False

        def events() -> Iterator[dict[str, Any]]:
            parent = st.models.get(base)
            if parent is None:
                yield {"error": f"model '{base}' not found"}
                return
            yield {"status": f"using existing layer sha256:{parent.digest}"}
            layer = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
            yield {"status": f"creating new layer sha256:{layer}"}
            if name in st.fail_create:
                yield {"error": "write manifest: no space left on device"}
                return
            yield {"status": "writing manifest"}
            digest = hashlib.sha256(f"{parent.digest}{layer}".encode()).hexdigest()
            with st.lock:
                st.models[name] = StandinModel(
                    name, parent.gguf, digest, parent.size, parent_model=base, parameters=dict(params)
                )
                st.loaded.pop(name, None)  # a re-created model is reloaded on next use
            yield {"status": "success"}

        self._stream(events(), stream)

    def _keep(self, name: str, keep_alive: Any) -> None:
        st = self.server_state
        if keep_alive is None:
            seconds = 300.0
        elif isinstance(keep_alive, (int, float)):
            seconds = float(keep_alive)
        else:
            text = str(keep_alive)
            units = {"s": 1, "m": 60, "h": 3600}
            seconds = float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
        with st.lock:
            if seconds == 0:
                st.loaded.pop(name, None)
            else:
                st.loaded[name] = float("inf") if seconds < 0 else time.monotonic() + seconds

    def _model_or_404(self, body: dict[str, Any]) -> str | None:
        name = full_name(str(body.get("model") or ""))
        if name not in self.server_state.models:
            self._error(404, f'model "{body.get("model")}" not found, try pulling it first')
            return None
        return name

    def _forward(self, messages: list[dict[str, Any]], options: dict[str, Any]) -> str:
        st = self.server_state
        if st.llama_url is None:
            raise RuntimeError("this stand-in has no llama-server to generate with")
        # The chat template applied by llama-server, then a plain completion: as Ollama's runner does,
        # with no parsing of the output (a tiny random model's output is no well-formed anything).
        with httpx.Client(base_url=st.llama_url, timeout=60, trust_env=False) as c:
            r = c.post("/apply-template", json={"messages": messages})
            if r.status_code == 200:
                n = int(options.get("num_predict") or 8)
                body = {"prompt": r.json()["prompt"], "n_predict": n, **st.llama_options}
                r = c.post("/completion", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"llama-server answered {r.status_code}: {r.text[:200]}")
        return str(r.json().get("content") or "")

    def _answer(self, name: str, body: dict[str, Any], content: str, chat: bool) -> None:
        base = {"model": body.get("model"), "created_at": _now()}
        piece = {"role": "assistant", "content": content} if chat else None
        final = {
            **base,
            "done": True,
            "done_reason": "stop",
            "total_duration": 1,
            "load_duration": 1,
            "prompt_eval_count": 1,
            "prompt_eval_duration": 1,
            "eval_count": max(1, len(content.split())),
            "eval_duration": 1,
        }
        if body.get("stream", True) is False:
            final["message" if chat else "response"] = piece if chat else content
            self._json(200, final)
            return
        first = {**base, "done": False}
        first["message" if chat else "response"] = piece if chat else content
        final["message" if chat else "response"] = {"role": "assistant", "content": ""} if chat else ""
        self._stream(iter([first, final]), True)

    def _generate(self, body: dict[str, Any]) -> None:
        name = self._model_or_404(body)
        if name is None:
            return
        self._keep(name, body.get("keep_alive"))
        if not body.get("prompt"):
            done_reason = "unload" if body.get("keep_alive") == 0 else "load"
            self._json(
                200,
                {
                    "model": body.get("model"),
                    "created_at": _now(),
                    "response": "",
                    "done": True,
                    "done_reason": done_reason,
                },
            )
            return
        messages = [{"role": "user", "content": str(body["prompt"])}]
        try:
            content = self._forward(messages, body.get("options") or {})
        except (httpx.HTTPError, RuntimeError) as exc:
            self._error(500, f"llama runner: {exc}")
            return
        self._answer(name, body, content, chat=False)

    def _chat(self, body: dict[str, Any]) -> None:
        name = self._model_or_404(body)
        if name is None:
            return
        self._keep(name, body.get("keep_alive"))
        messages = body.get("messages") or []
        if not messages:
            self._json(
                200,
                {
                    "model": body.get("model"),
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": ""},
                    "done_reason": "load",
                    "done": True,
                },
            )
            return
        plain = [{"role": str(m.get("role", "user")), "content": str(m.get("content") or "")} for m in messages]
        try:
            content = self._forward(plain, body.get("options") or {})
        except (httpx.HTTPError, RuntimeError) as exc:
            self._error(500, f"llama runner: {exc}")
            return
        self._answer(name, body, content, chat=True)
