"""A stand-in for an Ollama server, for tests: no Ollama can be installed on the test machine.

This is NOT Ollama. It implements the part of Ollama's REST API that homelab
uses, following Ollama's docs/api.md for the 0.6 line (the JSON form of
`/api/create` with `model`, `from` and `parameters`, introduced in 0.5.5;
`model` as the name field everywhere):

- `GET /api/version`, `GET /api/tags`, `GET /api/ps` (each loaded model with `size`, `size_vram` and
  `expires_at`: when its `keep_alive` runs out, moved forward by every request it serves);
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
  With `stream: true` (the default, as in Ollama) the answer comes token by
  token, one NDJSON line per token llama-server streams, then a `done` line with
  `done_reason` (`stop`, or `length` when `num_predict` ran out) and the counts;
  `stream: false` gives one object. `num_predict` is 8 unless the request says
  (Ollama's is unbounded: a stand-in keeps tests short);
- `POST /api/embed` — `input` a string or a list of strings → `embeddings`, one
  per input. The vectors are the stand-in's own, not a model's: a unit vector
  from a hash of the text, `<arch>.embedding_length` long (same text, same
  vector), as Ollama's are L2-normalised;
- the OpenAI-compatible routes of Ollama's docs/openai.md: `POST
  /v1/chat/completions` and `POST /v1/completions` (with `stream: true`:
  server-sent events, one chunk per token, then `data: [DONE]`; `max_tokens`),
  `POST /v1/embeddings`, `GET /v1/models` and `GET /v1/models/{model}`;
- an unknown model: 404 `{"error": "model 'x' not found"}` on /api routes, and
  on /v1 routes OpenAI's shape, `{"error": {"message": "model 'x' not found",
  "type": "not_found_error", "param": null, "code": null}}`.

Faults for tests: `drop_pull` (tags whose pull stream is cut half way: the
connection closes without the end of the chunked body) and `fail_create`.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
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
DEFAULT_NUM_PREDICT = 8
"""Tokens generated when a request sets no `num_predict` / `max_tokens` (Ollama's default is unbounded)."""


def full_name(name: str) -> str:
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def embedding_of(text: str, dims: int) -> list[float]:
    """The stand-in's embedding of `text`: a unit vector of `dims` floats from SHA-256 of the text (not a model's)."""
    raw = b""
    block = 0
    while len(raw) < 4 * dims:
        raw += hashlib.sha256(f"{block}:{text}".encode()).digest()
        block += 1
    values = [(v / 2**31) - 1.0 for v in struct.unpack(f"<{dims}I", raw[: 4 * dims])]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


class GenerationError(RuntimeError):
    """llama-server could not answer (or there is none): Ollama's 500 `{"error": "llama runner: ..."}`."""


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
        gpu: bool = True,
    ) -> None:
        self.registry = {full_name(k): Path(v) for k, v in registry.items()}
        self.llama_url = llama_url
        self.llama_options = dict(llama_options or {})
        """Extra fields for llama-server's /completion (e.g. a logit_bias that keeps a synthetic model's
        byte tokens out of its answers, which llama-server refuses as malformed output)."""
        self.gpu = gpu
        """Loaded models are reported in VRAM (`size_vram` = `size` on /api/ps), as on a GPU; 0 for a CPU node."""
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
                    entry["size_vram"] = m.size if st.gpu else 0
                    running.append(entry)
            self._json(200, {"models": running})
        elif self.path == "/v1/models" or self.path.startswith("/v1/models/"):
            self._openai_models(self.path)
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
            "/api/embed": self._embed,
            "/v1/chat/completions": lambda b: self._openai_generate(b, chat=True),
            "/v1/completions": lambda b: self._openai_generate(b, chat=False),
            "/v1/embeddings": self._openai_embeddings,
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

    def _model_or_404(self, body: dict[str, Any], openai: bool = False) -> str | None:
        """The model's full name, or None after answering 404 as Ollama does (OpenAI's error shape on /v1)."""
        given = str(body.get("model") or "")
        name = full_name(given)
        if name not in self.server_state.models:
            message = f"model '{given}' not found"
            if openai:
                self._json(404, {"error": {"message": message, "type": "not_found_error", "param": None, "code": None}})
            else:
                self._error(404, message)
            return None
        return name

    def _tokens(self, messages: list[dict[str, Any]], n_predict: int, counts: dict[str, Any]) -> Iterator[str]:
        """The answer's pieces as llama-server streams them: the chat template applied by llama-server, then a
        plain streaming `/completion`, as Ollama's runner does, with no parsing of the output (a tiny random
        model's output is no well-formed anything). `counts` gets `prompt`, `predicted` and `reason`."""
        st = self.server_state
        if st.llama_url is None:
            raise GenerationError("this stand-in has no llama-server to generate with")
        counts.update(prompt=0, predicted=0, reason="stop")
        with httpx.Client(base_url=st.llama_url, timeout=60, trust_env=False) as c:
            r = c.post("/apply-template", json={"messages": messages})
            if r.status_code != 200:
                raise GenerationError(f"llama-server answered {r.status_code}: {r.text[:200]}")
            body = {"prompt": r.json()["prompt"], "n_predict": n_predict, "stream": True, **st.llama_options}
            with c.stream("POST", "/completion", json=body) as r:
                if r.status_code != 200:
                    raise GenerationError(f"llama-server answered {r.status_code}: {r.read().decode()[:200]}")
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise GenerationError(f"llama-server: {event['error']}")
                    piece = str(event.get("content") or "")
                    if piece:
                        counts["predicted"] += 1
                        yield piece
                    if event.get("stop"):
                        counts["prompt"] = int(event.get("tokens_evaluated") or 0)
                        counts["predicted"] = int(event.get("tokens_predicted") or counts["predicted"])
                        counts["reason"] = "length" if event.get("stop_type") == "limit" else "stop"

    def _generation(self, messages: list[dict[str, Any]], n_predict: int) -> tuple[Iterator[str], dict[str, Any]]:
        """`_tokens`, with the first piece fetched already: a llama-server that cannot answer is a GenerationError
        here, before any status line is sent, rather than a broken stream."""
        counts: dict[str, Any] = {}
        tokens = self._tokens(messages, n_predict, counts)
        try:
            first = next(tokens)
        except StopIteration:
            return iter(()), counts
        except httpx.HTTPError as exc:
            raise GenerationError(str(exc)) from None

        def pieces() -> Iterator[str]:
            yield first
            yield from tokens

        return pieces(), counts

    def _chunked(self, content_type: str, chunks: Iterator[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # ------------------------------------------------------------------ Ollama's native generation

    def _answer(self, body: dict[str, Any], messages: list[dict[str, Any]], chat: bool) -> None:
        options = body.get("options") or {}
        n_predict = int(options.get("num_predict") or DEFAULT_NUM_PREDICT)
        started = time.monotonic_ns()
        try:
            pieces, counts = self._generation(messages, n_predict)
        except GenerationError as exc:
            self._error(500, f"llama runner: {exc}")
            return
        key = "message" if chat else "response"

        def part(text: str) -> Any:
            return {"role": "assistant", "content": text} if chat else text

        def final(text: str) -> dict[str, Any]:
            took = max(1, time.monotonic_ns() - started)
            return {
                "model": body.get("model"),
                "created_at": _now(),
                key: part(text),
                "done": True,
                "done_reason": counts.get("reason", "stop"),
                "total_duration": took,
                "load_duration": 1,
                "prompt_eval_count": counts.get("prompt", 0),
                "prompt_eval_duration": 1,
                "eval_count": counts.get("predicted", 0),
                "eval_duration": took,
            }

        if body.get("stream", True) is False:
            try:
                text = "".join(pieces)
            except (GenerationError, httpx.HTTPError) as exc:
                self._error(500, f"llama runner: {exc}")
                return
            self._json(200, final(text))
            return

        def lines() -> Iterator[bytes]:
            try:
                for piece in pieces:
                    event = {"model": body.get("model"), "created_at": _now(), key: part(piece), "done": False}
                    yield (json.dumps(event) + "\n").encode()
            except (GenerationError, httpx.HTTPError) as exc:  # mid-stream, as Ollama: an error line ends it
                yield (json.dumps({"error": f"llama runner: {exc}"}) + "\n").encode()
                return
            yield (json.dumps(final("")) + "\n").encode()

        self._chunked("application/x-ndjson", lines())

    def _loaded_only(self, body: dict[str, Any], chat: bool) -> None:
        """A request with nothing to generate: the model is loaded (or unloaded with keep_alive 0)."""
        done_reason = "unload" if body.get("keep_alive") == 0 else "load"
        key = "message" if chat else "response"
        empty: Any = {"role": "assistant", "content": ""} if chat else ""
        self._json(
            200,
            {"model": body.get("model"), "created_at": _now(), key: empty, "done": True, "done_reason": done_reason},
        )

    def _generate(self, body: dict[str, Any]) -> None:
        name = self._model_or_404(body)
        if name is None:
            return
        self._keep(name, body.get("keep_alive"))
        if not body.get("prompt"):
            self._loaded_only(body, chat=False)
            return
        self._answer(body, [{"role": "user", "content": str(body["prompt"])}], chat=False)

    def _chat(self, body: dict[str, Any]) -> None:
        name = self._model_or_404(body)
        if name is None:
            return
        self._keep(name, body.get("keep_alive"))
        messages = body.get("messages") or []
        if not messages:
            self._loaded_only(body, chat=True)
            return
        self._answer(body, _plain(messages), chat=True)

    def _inputs(self, value: Any) -> list[str] | None:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        return None

    def _vectors(self, name: str, inputs: list[str]) -> list[list[float]]:
        m = self.server_state.models[name]
        md = read_header(m.gguf).metadata
        dims = md.get(f"{md.get('general.architecture')}.embedding_length")
        return [embedding_of(text, dims if isinstance(dims, int) and dims > 0 else 256) for text in inputs]

    def _embed(self, body: dict[str, Any]) -> None:
        name = self._model_or_404(body)
        if name is None:
            return
        inputs = self._inputs(body.get("input"))
        if inputs is None:
            self._error(400, "invalid input type")
            return
        self._keep(name, body.get("keep_alive"))
        self._json(
            200,
            {
                "model": body.get("model"),
                "embeddings": self._vectors(name, inputs),
                "total_duration": 1,
                "load_duration": 1,
                "prompt_eval_count": sum(len(text.split()) for text in inputs),
            },
        )

    # ------------------------------------------------------------------ the OpenAI-compatible routes

    def _openai_error(self, status: int, message: str) -> None:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        self._json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

    def _openai_generate(self, body: dict[str, Any], chat: bool) -> None:
        name = self._model_or_404(body, openai=True)
        if name is None:
            return
        if chat:
            if not isinstance(body.get("messages"), list) or not body["messages"]:
                self._openai_error(400, "[] is too short - 'messages'")
                return
            messages = _plain(body["messages"])
        else:
            if not isinstance(body.get("prompt"), str):
                self._openai_error(400, "invalid prompt")
                return
            messages = [{"role": "user", "content": body["prompt"]}]
        self._keep(name, body.get("keep_alive"))
        n_predict = int(body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_NUM_PREDICT)
        try:
            pieces, counts = self._generation(messages, n_predict)
        except GenerationError as exc:
            self._openai_error(500, f"llama runner: {exc}")
            return
        ident = ("chatcmpl-" if chat else "cmpl-") + hashlib.sha256(f"{time.time_ns()}".encode()).hexdigest()[:8]
        head = {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "system_fingerprint": "fp_ollama",
        }

        def usage() -> dict[str, int]:
            p, c = int(counts.get("prompt", 0)), int(counts.get("predicted", 0))
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        def choice(text: str, finish: str | None, stream: bool) -> dict[str, Any]:
            if not chat:
                return {"text": text, "index": 0, "finish_reason": finish}
            key = "delta" if stream else "message"
            return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}

        if body.get("stream") is not True:
            try:
                text = "".join(pieces)
            except (GenerationError, httpx.HTTPError) as exc:
                self._openai_error(500, f"llama runner: {exc}")
                return
            self._json(200, {**head, "choices": [choice(text, counts.get("reason", "stop"), False)], "usage": usage()})
            return
        if chat:
            head["object"] = "chat.completion.chunk"
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def events() -> Iterator[bytes]:
            def sse(data: Any) -> bytes:
                return f"data: {json.dumps(data)}\n\n".encode()

            try:
                for piece in pieces:
                    yield sse({**head, "choices": [choice(piece, None, True)]})
            except (GenerationError, httpx.HTTPError) as exc:
                message = f"llama runner: {exc}"
                yield sse({"error": {"message": message, "type": "api_error", "param": None, "code": None}})
                return
            yield sse({**head, "choices": [choice("", counts.get("reason", "stop"), True)]})
            if with_usage:
                yield sse({**head, "choices": [], "usage": usage()})
            yield b"data: [DONE]\n\n"

        self._chunked("text/event-stream", events())

    def _openai_embeddings(self, body: dict[str, Any]) -> None:
        name = self._model_or_404(body, openai=True)
        if name is None:
            return
        inputs = self._inputs(body.get("input"))
        if inputs is None or not inputs:
            self._openai_error(400, "invalid input")
            return
        self._keep(name, body.get("keep_alive"))
        vectors = self._vectors(name, inputs)
        tokens = sum(len(text.split()) for text in inputs)
        self._json(
            200,
            {
                "object": "list",
                "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
                "model": body.get("model"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    def _openai_model(self, m: StandinModel) -> dict[str, Any]:
        created = int(datetime.fromisoformat(m.modified_at).timestamp())
        owner = m.name.rsplit("/", 1)[0] if "/" in m.name else "library"
        return {"id": m.name, "object": "model", "created": created, "owned_by": owner}

    def _openai_models(self, path: str) -> None:
        st = self.server_state
        with st.lock:
            models = list(st.models.values())
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [self._openai_model(m) for m in models]})
            return
        given = path.removeprefix("/v1/models/")
        found = [m for m in models if m.name == full_name(given)]
        if not found:
            self._openai_error(404, f"model '{given}' not found")
            return
        self._json(200, self._openai_model(found[0]))


def _plain(messages: list[Any]) -> list[dict[str, Any]]:
    """Chat messages as llama-server's /apply-template takes them: role and text content (OpenAI's list of
    content parts joined)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
        out.append({"role": str(m.get("role", "user")), "content": str(content or "")})
    return out
