"""Wait for an HTTP endpoint to answer 200: the one polling loop behind every "wait until it is up"."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from controller.drivers.httpjson import BadAnswer, read_capped

POLL_BYTES = 1 << 20
"""The most of a polled answer that is read (only its status matters)."""


def poll_200(
    url: str,
    timeout: float,
    *,
    every: float = 0.2,
    request_timeout: float = 2.0,
    describe: Callable[[int], str] = lambda code: f"HTTP {code}",
    between: Callable[[], None] = lambda: None,
    error_is_ok: Callable[[httpx.HTTPError], bool] = lambda exc: False,
) -> str | None:
    """GET `url` until it answers 200 or `timeout` seconds pass. None when it answered; else the last
    reason it did not ("no answer", `describe(status)`, or the error's type name). Each GET is bounded
    as a whole (`request_timeout`) and in size (`POLL_BYTES`).

    `between()` runs after each miss and may raise to stop waiting (a process that exited, a cancel);
    `error_is_ok(exc)` counts a request error as done (a proxy this machine cannot reach)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with httpx.Client(timeout=request_timeout, trust_env=False) as client:
        while time.monotonic() < deadline:
            try:
                code, _ = read_capped(client, "GET", url, what=url, deadline=request_timeout, max_bytes=POLL_BYTES)
                if code == 200:
                    return None
                last = describe(code)
            except httpx.HTTPError as exc:
                if error_is_ok(exc):
                    return None
                last = type(exc).__name__
            except BadAnswer as exc:
                last = str(exc).removeprefix(url + ": ")
            between()
            time.sleep(every)
    return last
