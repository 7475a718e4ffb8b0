"""One node's Ollama server through its HTTP API (httpx, async), with a small sync facade.

`OllamaHttp` implements `controller.drivers.base.OllamaNode` for the executor,
which runs node steps in threads: every call runs one coroutine of
`OllamaClient` with `asyncio.run`, on a client opened for that call.

Endpoints (Ollama's docs/api.md): `GET /api/tags`, `GET /api/ps`,
`POST /api/show`, `POST /api/pull` and `POST /api/create` (streamed NDJSON),
`DELETE /api/delete`, `POST /api/generate` without a prompt (load a model, with
`keep_alive`).

Errors are one line. A streamed pull or create succeeds only when Ollama's
last line is `{"status": "success"}`: an `{"error": …}` line, an HTTP error or
a stream that ends early (connection dropped) raises `DriverError`, and
Ollama writes a model's manifest only at the end, so nothing half-made is
left under the model's name.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import httpx

from controller.core.state import OLLAMA_PREFIX, OllamaModelState
from controller.drivers.base import DriverError, NodeUnreachable, ProgressFn

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
    if not values:
        return None
    try:
        return int(float(values[-1]))
    except ValueError:
        return None


def _error_text(r: httpx.Response) -> str:
    try:
        data = r.json()
    except ValueError:
        return f"HTTP {r.status_code}"
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return f"{data['error']} (HTTP {r.status_code})"
    return f"HTTP {r.status_code}"


class OllamaClient:
    """Async calls to one Ollama server. `timeout` bounds each read, not a whole pull."""

    def __init__(self, url: str, *, timeout: float = 10.0, load_timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.load_timeout = load_timeout

    def _client(self, read: float | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(self.timeout, read=read or self.timeout), trust_env=False
        )

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            async with self._client(self.load_timeout if path == "/api/generate" else None) as c:
                return await c.request(method, path, json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise NodeUnreachable(f"Ollama at {self.url} does not answer ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise DriverError(f"Ollama at {self.url}: {method} {path} failed: {exc or type(exc).__name__}") from None

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        r = await self._call(method, path, body)
        if r.status_code != 200:
            raise DriverError(f"Ollama at {self.url}: {path}: {_error_text(r)}")
        data = r.json()
        if not isinstance(data, dict):
            raise DriverError(f"Ollama at {self.url}: {path}: not a JSON object")
        return data

    async def version(self) -> str:
        return str((await self._json("GET", "/api/version")).get("version", ""))

    async def tags(self) -> list[dict[str, Any]]:
        return list((await self._json("GET", "/api/tags")).get("models") or [])

    async def ps(self) -> list[dict[str, Any]]:
        return list((await self._json("GET", "/api/ps")).get("models") or [])

    async def show(self, name: str) -> dict[str, Any]:
        return await self._json("POST", "/api/show", {"model": name})

    async def delete(self, name: str) -> None:
        r = await self._call("DELETE", "/api/delete", {"model": name})
        if r.status_code not in (200, 404):
            raise DriverError(f"Ollama at {self.url}: delete {name}: {_error_text(r)}")

    async def generate_load(self, name: str, keep_alive: float | None) -> None:
        body: dict[str, Any] = {"model": name, "keep_alive": -1 if keep_alive is None else int(keep_alive)}
        data = await self._json("POST", "/api/generate", body)
        if not data.get("done", False):
            raise DriverError(f"Ollama at {self.url}: loading {name} did not finish")

    async def stream(self, path: str, body: dict[str, Any], what: str, on_status: StatusFn | None = None) -> None:
        """POST a streamed request; succeed only on a final `{"status": "success"}` line."""
        last = "(nothing)"
        try:
            async with self._client(read=max(self.timeout, 60.0)) as c, c.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise DriverError(f"{what}: {_error_text(r)}")
                async for line in r.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        raise DriverError(f"{what}: Ollama sent a line that is not JSON: {line[:80]!r}") from None
                    if isinstance(event, dict) and "error" in event:
                        raise DriverError(f"{what}: {event['error']}")
                    if not isinstance(event, dict):
                        continue
                    last = str(event.get("status", last))
                    if on_status is not None:
                        on_status(event)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise NodeUnreachable(f"{what}: Ollama at {self.url} does not answer ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise DriverError(
                f"{what}: connection dropped before Ollama finished (last status: {last}; {type(exc).__name__})"
            ) from None
        if last != "success":
            raise DriverError(f"{what}: the stream ended before Ollama reported success (last status: {last})")

    async def pull(self, tag: str, progress: ProgressFn | None = None) -> None:
        layers: dict[str, tuple[int, int]] = {}

        def status(event: dict[str, Any]) -> None:
            digest, total = event.get("digest"), event.get("total")
            if progress is None or not digest or not isinstance(total, int):
                return
            layers[str(digest)] = (int(event.get("completed") or 0), total)
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
        return sorted(str(m.get("name") or m.get("model")) for m in self._run(self.client.tags))

    def loaded(self) -> list[str]:
        return sorted(str(m.get("name") or m.get("model")) for m in self._run(self.client.ps))

    def derived(self, name: str) -> OllamaModelState:
        data = self._run(lambda: self.client.show(name))
        params = parse_parameters(str(data.get("parameters") or ""))
        details = data.get("details") or {}
        model = name.removeprefix(OLLAMA_PREFIX).rsplit(":", 1)[0] if name.startswith(OLLAMA_PREFIX) else ""
        return OllamaModelState(
            node=self.node,
            name=name,
            model=model,
            base=str(details.get("parent_model") or ""),
            num_gpu=_int(params.get("num_gpu")),
            num_ctx=_int(params.get("num_ctx")),
        )

    def model_info(self, name: str) -> dict[str, object]:
        data = self._run(lambda: self.client.show(name))
        return {"model_info": data.get("model_info") or {}, "details": data.get("details") or {}}

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
