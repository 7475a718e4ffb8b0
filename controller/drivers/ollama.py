"""One node's Ollama server through its HTTP API (httpx, async), with a small sync facade.

`OllamaHttp` implements `controller.drivers.base.OllamaNode` for the executor,
which runs node steps in threads: every call runs one coroutine of
`OllamaClient` with `asyncio.run`, on a client opened for that call.

Endpoints (Ollama's docs/api.md): `GET /api/tags`, `GET /api/ps`,
`POST /api/show`, `POST /api/pull` and `POST /api/create` (streamed NDJSON),
`DELETE /api/delete`, `POST /api/generate` without a prompt (load a model, with
`keep_alive`).

Every JSON request goes through `drivers.httpjson` (a deadline for the whole
request, a cap on the answer's size, no NaN or Infinity), and each answer's shape
is checked: whatever the server says, a caller gets the data or a one-line
`DriverError` naming the server (`BadAnswer` for an answer it cannot use).
`derived_many` reads many models' `/api/show` on one client, a few at a time
(`homelab import` of a server with thousands of tags).

Errors are one line. A streamed pull or create succeeds only when Ollama's
last line is `{"status": "success"}`: an `{"error": …}` line, an HTTP error or
a stream that ends early (connection dropped) raises `DriverError`, and
Ollama writes a model's manifest only at the end, so nothing half-made is
left under the model's name.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import httpx

from controller.core.state import OLLAMA_PREFIX, OllamaModelState
from controller.drivers.base import DriverError, NodeUnreachable, ProgressFn
from controller.drivers.httpjson import MAX_BYTES, BadAnswer, bounded_request_async, error_text, parse
from specs.jsontext import loads

MAX_LINE = 1 << 20
"""The longest line of a streamed pull or create that is read."""

T = TypeVar("T")
StatusFn = Callable[[dict[str, Any]], None]


def parse_parameters(text: str) -> dict[str, list[str]]:
    """`/api/show`'s `parameters` text (`num_ctx    4096` per line) → {name: [values]}."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            out.setdefault(parts[0], []).append(parts[1].strip().strip('"'))
    return out


def _int(values: list[str] | None) -> int | None:
    """The last value as a whole number; None when there is none or it is not one (`abc`, `1e999`, `nan`)."""
    if not values:
        return None
    try:
        number = float(values[-1])
    except ValueError:
        return None
    if not math.isfinite(number) or abs(number) > MAX_PARAMETER:
        return None
    return int(number)


MAX_PARAMETER = 1 << 40
"""A parameter (`num_ctx`, `num_gpu`) beyond this is no number Ollama would take: read as unset."""
SHOW_CONCURRENCY = 8
"""`/api/show` requests in flight at once when reading many models (`derived_many`)."""


def _names(data: dict[str, Any], what: str) -> list[str]:
    """The model names of a `/api/tags` or `/api/ps` answer (`models: [{name|model: …}]`)."""
    models = data.get("models")
    if models is None:
        return []
    if not isinstance(models, list):
        raise BadAnswer(f"{what}: `models` is not a list")
    names: list[str] = []
    for entry in models:
        name = entry.get("name") or entry.get("model") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise BadAnswer(f"{what}: an entry of `models` has no name: {str(entry)[:80]!r}")
        names.append(name)
    return names


def _field(data: dict[str, Any], key: str, kind: type, what: str) -> Any:
    """`data[key]` when it has the type `kind`; `kind()` when it is absent or null; else BadAnswer."""
    value = data.get(key)
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise BadAnswer(f"{what}: `{key}` is not {'an object' if kind is dict else 'a ' + kind.__name__}")
    return value


class OllamaClient:
    """Async calls to one Ollama server. `timeout` bounds each whole JSON request (`load_timeout` a
    model load), and each answer is at most `max_bytes`; a streamed pull or create is bounded per read."""

    def __init__(
        self, url: str, *, timeout: float = 10.0, load_timeout: float = 300.0, max_bytes: int = MAX_BYTES
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.load_timeout = load_timeout
        self.max_bytes = max_bytes

    def _client(self, read: float | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(self.timeout, read=read or self.timeout), trust_env=False
        )

    def _what(self, method: str, path: str) -> str:
        return f"Ollama at {self.url}: {method} {path}"

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, client: httpx.AsyncClient | None = None
    ) -> tuple[int, bytes]:
        """(status, body) of one request, on `client` (one opened for it when None)."""
        deadline = self.load_timeout if path == "/api/generate" else self.timeout
        try:
            if client is not None:
                return await bounded_request_async(
                    client,
                    method,
                    path,
                    what=self._what(method, path),
                    deadline=deadline,
                    max_bytes=self.max_bytes,
                    body=body,
                )
            async with self._client(deadline) as c:
                return await bounded_request_async(
                    c,
                    method,
                    path,
                    what=self._what(method, path),
                    deadline=deadline,
                    max_bytes=self.max_bytes,
                    body=body,
                )
        except NodeUnreachable as exc:
            cause = str(exc).rsplit("(", 1)[-1].rstrip(")")
            raise NodeUnreachable(f"Ollama at {self.url} does not answer ({cause})") from None

    async def _json(
        self, method: str, path: str, body: dict[str, Any] | None = None, client: httpx.AsyncClient | None = None
    ) -> dict[str, Any]:
        status, raw = await self._call(method, path, body, client)
        if status != 200:
            raise DriverError(f"Ollama at {self.url}: {path}: {error_text(status, raw)}")
        data = parse(self._what(method, path), raw)
        if not isinstance(data, dict):
            raise BadAnswer(f"Ollama at {self.url}: {path}: not a JSON object")
        return data

    async def version(self) -> str:
        return str((await self._json("GET", "/api/version")).get("version", ""))

    async def tags(self) -> list[str]:
        """The names of the models on the server."""
        return _names(await self._json("GET", "/api/tags"), f"Ollama at {self.url}: /api/tags")

    async def ps(self) -> list[str]:
        """The names of the models loaded now."""
        return _names(await self._json("GET", "/api/ps"), f"Ollama at {self.url}: /api/ps")

    async def show(self, name: str, client: httpx.AsyncClient | None = None) -> dict[str, Any]:
        """`/api/show` of `name`, its fields checked: `details` and `model_info` objects, `parameters` text."""
        data = await self._json("POST", "/api/show", {"model": name}, client)
        what = f"Ollama at {self.url}: /api/show {name}"
        return {
            "details": _field(data, "details", dict, what),
            "model_info": _field(data, "model_info", dict, what),
            "parameters": _field(data, "parameters", str, what),
        }

    async def show_many(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """`show` of each name, on one client, `SHOW_CONCURRENCY` at a time; in the order given."""
        limit = asyncio.Semaphore(SHOW_CONCURRENCY)
        limits = httpx.Limits(max_connections=SHOW_CONCURRENCY, max_keepalive_connections=SHOW_CONCURRENCY)
        async with httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(self.timeout), trust_env=False, limits=limits
        ) as client:

            async def one(name: str) -> dict[str, Any]:
                async with limit:
                    return await self.show(name, client)

            return list(await asyncio.gather(*(one(name) for name in names)))

    async def delete(self, name: str) -> None:
        status, raw = await self._call("DELETE", "/api/delete", {"model": name})
        if status not in (200, 404):
            raise DriverError(f"Ollama at {self.url}: delete {name}: {error_text(status, raw)}")

    async def generate_load(self, name: str, keep_alive: float | None) -> None:
        body: dict[str, Any] = {"model": name, "keep_alive": -1 if keep_alive is None else int(keep_alive)}
        data = await self._json("POST", "/api/generate", body)
        if data.get("done") is not True:
            raise DriverError(f"Ollama at {self.url}: loading {name} did not finish")

    async def stream(self, path: str, body: dict[str, Any], what: str, on_status: StatusFn | None = None) -> None:
        """POST a streamed request; succeed only on a final `{"status": "success"}` line. Each line is at
        most `MAX_LINE` bytes (a status line is a few hundred)."""
        last = "(nothing)"
        try:
            async with self._client(read=max(self.timeout, 60.0)) as c, c.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    raw = bytearray()
                    async for chunk in r.aiter_bytes():
                        raw += chunk
                        if len(raw) > MAX_LINE:
                            break
                    raise DriverError(f"{what}: {error_text(r.status_code, bytes(raw[:MAX_LINE]))}")
                pending = bytearray()
                async for chunk in r.aiter_bytes():
                    pending += chunk
                    *lines, rest = pending.split(b"\n")
                    if len(rest) > MAX_LINE:
                        raise BadAnswer(f"{what}: Ollama sent a line longer than {MAX_LINE} bytes")
                    pending = bytearray(rest)
                    for line in lines:
                        last = self._status_line(bytes(line), what, last, on_status)
                if pending.strip():
                    last = self._status_line(bytes(pending), what, last, on_status)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise NodeUnreachable(f"{what}: Ollama at {self.url} does not answer ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise DriverError(
                f"{what}: connection dropped before Ollama finished (last status: {last}; {type(exc).__name__})"
            ) from None
        if last != "success":
            raise DriverError(f"{what}: the stream ended before Ollama reported success (last status: {last})")

    @staticmethod
    def _status_line(line: bytes, what: str, last: str, on_status: StatusFn | None) -> str:
        """One line of a pull or create stream: the new last status; DriverError on an `error` line."""
        if not line.strip():
            return last
        try:
            event = loads(line)
        except ValueError:
            raise BadAnswer(f"{what}: Ollama sent a line that is not JSON: {line[:80]!r}") from None
        if not isinstance(event, dict):
            return last
        if "error" in event:
            raise DriverError(f"{what}: {str(event['error']).splitlines()[0][:200] if event['error'] else 'error'}")
        if on_status is not None:
            on_status(event)
        return str(event.get("status", last))[:200]

    async def pull(self, tag: str, progress: ProgressFn | None = None) -> None:
        layers: dict[str, tuple[int, int]] = {}

        def status(event: dict[str, Any]) -> None:
            digest, total = event.get("digest"), event.get("total")
            if progress is None or not digest or not isinstance(total, int):
                return
            completed = event.get("completed")
            layers[str(digest)[:200]] = (completed if isinstance(completed, int) else 0, total)
            progress(sum(d for d, _ in layers.values()), sum(t for _, t in layers.values()))

        await self.stream("/api/pull", {"model": tag, "stream": True}, f"pull {tag}", status)

    async def create(self, name: str, base: str, parameters: dict[str, Any]) -> None:
        body = {"model": name, "from": base, "parameters": parameters, "stream": True}
        await self.stream("/api/create", body, f"create {name} from {base}")


class OllamaHttp:
    """The sync facade the engine and the executor use (`OllamaNode`)."""

    def __init__(self, node: str, url: str, *, timeout: float = 10.0, load_timeout: float = 300.0) -> None:
        self.node = node
        self.client = OllamaClient(url, timeout=timeout, load_timeout=load_timeout)

    def _run(self, make: Callable[[], Awaitable[T]]) -> T:
        async def main() -> T:
            return await make()

        coro: Coroutine[Any, Any, T] = main()
        return asyncio.run(coro)

    def ping(self) -> None:
        self._run(self.client.version)

    def list_models(self) -> list[str]:
        return sorted(self._run(self.client.tags))

    def loaded(self) -> list[str]:
        return sorted(self._run(self.client.ps))

    def _derived(self, name: str, data: dict[str, Any]) -> OllamaModelState:
        params = parse_parameters(data["parameters"])
        parent = data["details"].get("parent_model")
        model = name.removeprefix(OLLAMA_PREFIX).rsplit(":", 1)[0] if name.startswith(OLLAMA_PREFIX) else ""
        return OllamaModelState(
            node=self.node,
            name=name,
            model=model,
            base=parent if isinstance(parent, str) else "",
            num_gpu=_int(params.get("num_gpu")),
            num_ctx=_int(params.get("num_ctx")),
        )

    def derived(self, name: str) -> OllamaModelState:
        return self._derived(name, self._run(lambda: self.client.show(name)))

    def derived_many(self, names: Sequence[str]) -> list[OllamaModelState]:
        """`derived` of each name, read concurrently on one client (a few at a time), in the order given."""
        shown = self._run(lambda: self.client.show_many(names))
        return [self._derived(name, data) for name, data in zip(names, shown, strict=True)]

    def model_info(self, name: str) -> dict[str, object]:
        data = self._run(lambda: self.client.show(name))
        return {"model_info": data["model_info"], "details": data["details"]}

    def pull(self, tag: str, progress: ProgressFn | None = None) -> None:
        self._run(lambda: self.client.pull(tag, progress))

    def create(self, desired: OllamaModelState) -> None:
        params: dict[str, Any] = {}
        if desired.num_gpu is not None:
            params["num_gpu"] = desired.num_gpu
        if desired.num_ctx is not None:
            params["num_ctx"] = desired.num_ctx
        self._run(lambda: self.client.create(desired.name, desired.base, params))

    def delete(self, name: str) -> None:
        self._run(lambda: self.client.delete(name))

    def preload(self, name: str, keep_alive: float | None) -> None:
        self._run(lambda: self.client.generate_load(name, keep_alive))
