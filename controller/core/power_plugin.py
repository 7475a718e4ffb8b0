"""The gateway's wake-on-request callback: a LiteLLM plugin written next to the config as `homelab_power.py`.

A request routed to a model whose every replica is on a node homelab put to sleep sends that node one wake
(a Wake-on-LAN packet, or its wake command with the secret on stdin) and then, per the node's
`power.on_request`:

    wait      holds the request until one of the model's replicas answers its health URL (bounded by
              `power.wake_timeout`), then lets LiteLLM send it there
    fallback  sends it at once to the first entry of the requested group's fallback chain that is awake,
              while the node wakes

How the plugin learns that a node is asleep: homelab writes `homelab_power.json` next to the config
(atomically: temporary file and rename) whenever it puts a node to sleep or sees it awake again; the plugin
reads it when its modification time changes. A file rather than a probe on every request: only homelab knows
that a node is asleep *on purpose* (a node that is DOWN for another reason belongs to recovery, and a request
must not power-cycle it), and a stat per request costs nothing where a probe of a suspended machine costs its
whole connect timeout.

One wake per sleep: requests during one wake share it (one asyncio task per node, keyed by the time the node
went to sleep), so ten concurrent requests send one packet or one command. Every wake is a JSON line in
`homelab_power_events.jsonl` next to the file. Standard library only (the proxy's environment has no homelab);
the plugin never fails a request: anything unexpected lets the request through unchanged.

LiteLLM mechanism (1.108): `litellm_settings.callbacks: [homelab_power.handler]` loads this file from the
config's directory; a `CustomLogger`'s `async_pre_call_hook(user_api_key_dict, cache, data, call_type)` sees
every request's body before routing and may return a changed body.

An answer from a fallback says so. The proxy stamps the name the client asked for on every response's `model`
unless the request's metadata carries `_complexity_router_return_raw_model_name` (LiteLLM's own flag for a
plugin that rewrites the model). The rewritten body carries that flag and `homelab_fallback` ({"requested",
"model"}) in its metadata; the same body reaches `async_post_call_success_hook`, which sets the response's
`model` to the fallback that answered, and `async_post_call_response_headers_hook`, which adds
`x-homelab-model` (who answered) and `x-homelab-requested-model` (what was asked for) — on streamed answers
too, whose chunks then carry the answering server's own model name.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

POWER_MODULE = "homelab_power"
POWER_OBJECT = "handler"
POWER_FILE = POWER_MODULE + ".py"
POWER_STATE = "homelab_power.json"
"""Written by homelab next to the config: {node: {"state": "asleep"|"waking", "since": epoch seconds}}."""
POWER_EVENTS = "homelab_power_events.jsonl"
POLL_S = 0.25
FALLBACK_KEY = "homelab_fallback"
"""In the rewritten request's metadata: {"requested": the name asked for, "model": the fallback sent to}."""
RAW_MODEL_KEY = "_complexity_router_return_raw_model_name"
"""LiteLLM's metadata flag (litellm.constants.RETURN_RAW_MODEL_NAME_METADATA_KEY): do not restamp `model`."""
MODEL_HEADER = "x-homelab-model"
REQUESTED_HEADER = "x-homelab-requested-model"

_Base: type = object
try:  # in the proxy: a CustomLogger, so LiteLLM calls its hooks
    from litellm.integrations.custom_logger import CustomLogger  # type: ignore[import-not-found]

    _Base = CustomLogger
except ImportError:  # homelab's own environment (tests) has no litellm
    pass


def resolve_ref(ref: str) -> str:
    """A secret from its provider reference (env:NAME, file:/path, cmd:command), as homelab resolves it."""
    kind, _, rest = ref.partition(":")
    if kind == "env":
        return os.environ.get(rest, "")
    if kind == "file":
        with open(os.path.expanduser(rest), encoding="utf-8") as f:
            return f.read().rstrip("\n")
    if kind == "cmd":
        done = subprocess.run(rest, shell=True, capture_output=True, text=True, timeout=60, check=False)
        return done.stdout.rstrip("\n")
    raise ValueError(f"unknown secret provider {kind!r}")


def mark_fallback(data: Mapping[str, Any], requested: str, model: str) -> dict[str, Any]:
    """`data` sent to `model` instead, its metadata saying so (LiteLLM's `litellm_metadata` where the request has
    one, else `metadata`): what the response hooks read back."""
    key = "litellm_metadata" if isinstance(data.get("litellm_metadata"), dict) else "metadata"
    old = data.get(key)
    metadata = {**(old if isinstance(old, dict) else {}), FALLBACK_KEY: {"requested": requested, "model": model}}
    metadata[RAW_MODEL_KEY] = True
    return {**data, "model": model, key: metadata}


def fallback_of(data: Any) -> dict[str, str] | None:
    """What `mark_fallback` wrote into this request's metadata ({"requested", "model"}), or None."""
    if not isinstance(data, Mapping):
        return None
    for key in ("litellm_metadata", "metadata"):
        metadata = data.get(key)
        mark = metadata.get(FALLBACK_KEY) if isinstance(metadata, Mapping) else None
        if isinstance(mark, Mapping) and isinstance(mark.get("model"), str) and isinstance(mark.get("requested"), str):
            return {"requested": mark["requested"], "model": mark["model"]}
    return None


def say_who_answered(response: Any, model: str) -> Any:
    """`response` (LiteLLM's ModelResponse, or a dict) with its OpenAI `model` field set to `model`; a response
    without one (an image, a file) is left as it is."""
    if isinstance(response, dict):
        if "model" in response:
            response["model"] = model
    elif response is not None and hasattr(response, "model"):
        response.model = model
    return response


def magic_packet(mac: str) -> bytes:
    return b"\xff" * 6 + bytes.fromhex(mac.replace(":", "").replace("-", "")) * 16


class PowerHandler(_Base):  # type: ignore[misc]
    """`config`: {"nodes": {node: {"wake": {"wol": {mac, broadcast, port}} | {"command", "stdin"},
    "wake_timeout": s, "on_request": "wait"|"fallback"}}, "models": {model: [[node, health_url], ...]},
    "first": {requested name: [models it goes to first]}, "fallbacks": {requested name: [names]}}."""

    def __init__(self, config: Mapping[str, Any], directory: str | None = None) -> None:
        if _Base is not object:
            super().__init__()
        self.nodes: dict[str, Any] = dict(config.get("nodes") or {})
        self.models: dict[str, list[list[str]]] = dict(config.get("models") or {})
        self.first: dict[str, list[str]] = dict(config.get("first") or {})
        self.fallbacks: dict[str, list[str]] = dict(config.get("fallbacks") or {})
        self.directory = directory or os.path.dirname(os.path.abspath(__file__))
        self._stamp: int | None = None
        self._state: dict[str, Any] = {}
        self._waking: dict[tuple[str, float], asyncio.Future[bool]] = {}
        self.wakes_sent = 0

    # ---- what is asleep

    def state(self) -> dict[str, Any]:
        path = os.path.join(self.directory, POWER_STATE)
        try:
            stamp = os.stat(path).st_mtime_ns
        except OSError:
            self._stamp, self._state = None, {}
            return self._state
        if stamp != self._stamp:
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                self._state = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                return self._state
            self._stamp = stamp
        return self._state

    def asleep(self, node: str) -> bool:
        record = self.state().get(node)
        return isinstance(record, dict) and record.get("state") in ("asleep", "waking")

    def sleeping_model(self, model: str) -> bool:
        replicas = self.models.get(model) or []
        return bool(replicas) and all(node in self.nodes and self.asleep(node) for node, _ in replicas)

    # ---- the wake

    def _event(self, **fields: Any) -> None:
        line = json.dumps({"time": time.time(), **fields}, sort_keys=True)
        try:
            with open(os.path.join(self.directory, POWER_EVENTS), "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            pass

    async def _send_wake(self, node: str) -> bool:
        how = self.nodes[node]["wake"]
        self.wakes_sent += 1
        try:
            if how.get("wol"):
                w = how["wol"]
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    if str(w["broadcast"]).endswith(".255"):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                    sock.sendto(magic_packet(w["mac"]), (w["broadcast"], int(w["port"])))
                self._event(event="wake-sent", node=node, how="wol", ok=True)
                return True
            secret = resolve_ref(how["stdin"]).encode() + b"\n" if how.get("stdin") else None
            proc = await asyncio.create_subprocess_shell(
                how["command"],
                stdin=subprocess.PIPE if secret is not None else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(proc.communicate(secret), float(self.nodes[node]["wake_timeout"]))
            ok = proc.returncode == 0
            detail = "" if ok else f"exit {proc.returncode}: {err.decode(errors='replace').strip()[-200:]}"
            self._event(event="wake-sent", node=node, how="command", ok=ok, detail=detail)
            return ok
        except Exception as exc:  # never fail a request over a wake
            self._event(event="wake-sent", node=node, ok=False, detail=f"{type(exc).__name__}: {exc}")
            return False

    def wake(self, node: str) -> asyncio.Future[bool]:
        """The wake of `node` for its current sleep: sent once, shared by every request that needs it."""
        record = self.state().get(node) or {}
        key = (node, float(record.get("since") or 0.0))
        task = self._waking.get(key)
        if task is None:
            task = asyncio.ensure_future(self._send_wake(node))
            self._waking[key] = task
        return task

    async def _answers(self, url: str) -> bool:
        def get() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return bool(200 <= r.status < 300)
            except Exception:
                return False

        return await asyncio.to_thread(get)

    async def wait_awake(self, models: list[str], timeout: float) -> bool:
        urls = [url for m in models for _, url in self.models.get(m, [])]
        deadline = time.monotonic() + timeout
        while True:
            for url in urls:
                if await self._answers(url):
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_S)

    # ---- the hook

    async def handle(self, data: dict[str, Any]) -> dict[str, Any]:
        name = data.get("model")
        models = self.first.get(str(name)) if name is not None else None
        if not models or not all(self.sleeping_model(m) for m in models):
            return data
        nodes = sorted({node for m in models for node, _ in self.models[m]})
        wakes = [self.wake(node) for node in nodes]
        modes = {self.nodes[n].get("on_request", "wait") for n in nodes}
        if modes == {"fallback"}:
            for alt in self.fallbacks.get(str(name), []):
                alt_models = self.first.get(alt, [alt])
                if not all(self.sleeping_model(m) for m in alt_models):
                    self._event(event="fallback", model=name, to=alt, nodes=nodes)
                    return mark_fallback(data, str(name), alt)
        started = time.monotonic()
        await asyncio.gather(*wakes)
        timeout = max(float(self.nodes[n]["wake_timeout"]) for n in nodes)
        ok = await self.wait_awake(models, max(0.0, timeout - (time.monotonic() - started)))
        self._event(event="held", model=name, nodes=nodes, awake=ok, waited_s=round(time.monotonic() - started, 3))
        return data

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: Any
    ) -> Any:
        try:
            return await self.handle(data)
        except Exception as exc:  # the plugin never fails a request
            self._event(event="error", detail=f"{type(exc).__name__}: {exc}")
            return data

    async def async_post_call_success_hook(self, data: dict[str, Any], user_api_key_dict: Any, response: Any) -> Any:
        """A fallback's answer names the fallback, not the model that was asked for."""
        try:
            mark = fallback_of(data)
            return say_who_answered(response, mark["model"]) if mark is not None else response
        except Exception as exc:  # the plugin never fails a request
            self._event(event="error", detail=f"{type(exc).__name__}: {exc}")
            return response

    async def async_post_call_response_headers_hook(
        self,
        data: dict[str, Any],
        user_api_key_dict: Any,
        response: Any,
        request_headers: Any = None,
        litellm_call_info: Any = None,
    ) -> dict[str, str] | None:
        """`x-homelab-model` / `x-homelab-requested-model` on an answer from a fallback (streamed or not)."""
        mark = fallback_of(data)
        if mark is None:
            return None
        return {MODEL_HEADER: mark["model"], REQUESTED_HEADER: mark["requested"]}


def power_plugin_source(config: Mapping[str, Any]) -> str:
    """The text of `homelab_power.py`: this module's source, then the handler built from `config`."""
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    doc = json.dumps(config, sort_keys=True, ensure_ascii=True)
    return (
        "# Written by homelab (controller/core/power_plugin.py and the spec's `power` sections): the\n"
        "# wake-on-request callback of the LiteLLM config next to it. Edits here are replaced on the next reconcile.\n"
        + source
        + f"\n\n{POWER_OBJECT} = PowerHandler(json.loads({doc!r}))\n"
    )
