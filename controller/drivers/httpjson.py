"""One bounded HTTP request to a node, for every driver that reads JSON from one.

A node's answer is untrusted: a reverse proxy's HTML error page, a JSON shape nobody documented, a body
of hundreds of megabytes, or one byte every few seconds (which never trips a per-read timeout). So every
request here has a total deadline (monotonic, for the whole request: connect, headers and body) and a cap
on the body's size, and the body is parsed with `specs.jsontext.loads` (no NaN, Infinity, 1e999 or huge
integers). Whatever goes wrong is a one-line `DriverError` naming what was asked (`what`): `NodeUnreachable`
when nothing answers, `BadAnswer` when something answered that cannot be used.

The async form bounds the request with `asyncio.timeout`; the sync form checks the deadline after each
chunk and gives each read at most the time left, so it returns within the deadline plus one read.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from controller.drivers.base import DriverError, NodeUnreachable
from specs.jsontext import loads

MAX_BYTES = 16 << 20
"""The default cap on an answer's body: far above any /api/tags, /api/show or /v1/models homelab reads."""
IDENTITY = {"Accept-Encoding": "identity"}
"""Ask for no compression (a compressed answer is still read, its decoded bytes counted against the cap)."""


class BadAnswer(DriverError):
    """A node answered, but not with something that can be used (not JSON, too large, too slow, wrong shape)."""


def _too_large(what: str, max_bytes: int) -> BadAnswer:
    return BadAnswer(f"{what}: the answer is larger than {max_bytes} bytes")


def _declared_length(r: httpx.Response) -> int:
    try:
        return int(r.headers.get("content-length", "0"))
    except ValueError:
        return 0


def _transport_error(what: str, exc: httpx.HTTPError) -> DriverError:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return NodeUnreachable(f"{what}: does not answer ({type(exc).__name__})")
    if isinstance(exc, httpx.TimeoutException):
        return BadAnswer(f"{what}: no answer in time ({type(exc).__name__})")
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return DriverError(f"{what}: failed: {detail}")


async def read_capped_async(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    what: str,
    max_bytes: int = MAX_BYTES,
    body: Any = None,
    timeout: float | None = None,
) -> tuple[int, bytes]:
    """(status, body) of one request, the body at most `max_bytes` (BadAnswer beyond); httpx's errors are
    raised as they are, and nothing bounds the time: for a caller with its own deadline around it."""
    data = bytearray()
    extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    request = client.build_request(method, url, json=body, headers=IDENTITY, **extra)
    r = await client.send(request, stream=True)
    try:
        if _declared_length(r) > max_bytes:
            raise _too_large(what, max_bytes)
        async for chunk in r.aiter_bytes():
            data += chunk
            if len(data) > max_bytes:
                raise _too_large(what, max_bytes)
        return r.status_code, bytes(data)
    finally:
        await r.aclose()


async def bounded_request_async(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    what: str,
    deadline: float,
    max_bytes: int = MAX_BYTES,
    body: Any = None,
) -> tuple[int, bytes]:
    """(status, body) of one request, all of it within `deadline` seconds and `max_bytes` bytes."""
    try:
        async with asyncio.timeout(deadline):
            return await read_capped_async(client, method, url, what=what, max_bytes=max_bytes, body=body)
    except TimeoutError:
        raise BadAnswer(f"{what}: no complete answer within {deadline:g}s") from None
    except httpx.HTTPError as exc:
        raise _transport_error(what, exc) from None


def read_capped(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    what: str,
    deadline: float,
    max_bytes: int = MAX_BYTES,
    body: Any = None,
) -> tuple[int, bytes]:
    """(status, body) of one request within `deadline` seconds (plus at most one read) and `max_bytes`
    bytes (BadAnswer beyond either); httpx's own errors are raised as they are."""
    end = time.monotonic() + deadline
    data = bytearray()
    with client.stream(method, url, json=body, headers=IDENTITY, timeout=httpx.Timeout(deadline)) as r:
        if _declared_length(r) > max_bytes:
            raise _too_large(what, max_bytes)
        for chunk in r.iter_bytes():
            data += chunk
            if len(data) > max_bytes:
                raise _too_large(what, max_bytes)
            if time.monotonic() > end:
                raise BadAnswer(f"{what}: no complete answer within {deadline:g}s")
        return r.status_code, bytes(data)


def bounded_request(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    what: str,
    deadline: float,
    max_bytes: int = MAX_BYTES,
    body: Any = None,
) -> tuple[int, bytes]:
    """The sync form of `bounded_request_async` (within `deadline` plus at most one read)."""
    try:
        return read_capped(client, method, url, what=what, deadline=deadline, max_bytes=max_bytes, body=body)
    except httpx.HTTPError as exc:
        raise _transport_error(what, exc) from None


def parse(what: str, raw: bytes) -> Any:
    """The JSON of an answer's body; BadAnswer (one line, naming `what`) when it is not JSON."""
    try:
        return loads(raw)
    except ValueError as exc:
        start = raw[:40].decode("utf-8", "replace").split("\n")[0]
        raise BadAnswer(f"{what}: an unusable answer: {exc}; it starts {start!r}") from None


def error_text(status: int, raw: bytes) -> str:
    """A non-200 answer in one line: Ollama's and llama-server's `{"error": "…"}` where there is one."""
    try:
        data = loads(raw)
    except ValueError:
        return f"HTTP {status}"
    message = data.get("error") if isinstance(data, dict) else None
    if isinstance(message, dict):
        message = message.get("message")
    if isinstance(message, str) and message.strip():
        return f"{message.splitlines()[0][:200]} (HTTP {status})"
    return f"HTTP {status}"


async def bounded_json_async(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    what: str,
    deadline: float,
    max_bytes: int = MAX_BYTES,
    body: Any = None,
) -> Any:
    """The JSON of a 200 answer; DriverError (one line) for any other status, BadAnswer for a bad body."""
    status, raw = await bounded_request_async(
        client, method, url, what=what, deadline=deadline, max_bytes=max_bytes, body=body
    )
    if status != 200:
        raise DriverError(f"{what}: {error_text(status, raw)}")
    return parse(what, raw)


def bounded_json(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    what: str,
    deadline: float,
    max_bytes: int = MAX_BYTES,
    body: Any = None,
) -> Any:
    """The sync form of `bounded_json_async`."""
    status, raw = bounded_request(client, method, url, what=what, deadline=deadline, max_bytes=max_bytes, body=body)
    if status != 200:
        raise DriverError(f"{what}: {error_text(status, raw)}")
    return parse(what, raw)
