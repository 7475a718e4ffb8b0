"""Nodes that sleep when idle and wake on demand: the pure parts, the power state, and the gateway's plugin.

The plugin is exercised here as the proxy runs it (its rendered source executed, its hook awaited) against
a real HTTP health endpoint on loopback and a real wake command; tests/e2e/test_power.py runs it inside the
real LiteLLM proxy in the lab.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from controller.core.gateway_config import render_gateway
from controller.core.power_plugin import (
    POWER_EVENTS,
    POWER_FILE,
    POWER_STATE,
    PowerHandler,
    fallback_of,
    mark_fallback,
    power_plugin_source,
    say_who_answered,
)
from controller.effects.health import EXIT_CODES, Endpoint, Probe, Status, Verdict, classify, mark_asleep
from controller.effects.power import ASLEEP, WAKING, IdleTracker, PowerStore, Usage, sleep_due
from specs import parse_spec
from specs.model import ClusterSpec
from tests.support.wiring import desired_of

SPEC = """\
cluster: {name: lab}
secrets: {key: "env:HL_TEST_KEY", wakepw: "env:HL_TEST_WAKE"}
nodes:
  - name: desk
    tier: local
    address: 127.0.0.1
    ram: 8GiB
    ollama: {url: "http://127.0.0.1:11434"}
  - name: box
    tier: remote
    address: 127.0.0.5
    ssh: {user: root}
    docker: {endpoint: "unix:///tmp/none.sock"}
    gpus: [{index: 0, name: card, vram: 8GiB}]
    ram: 16GiB
    llamacpp: {image: "llama:test", ports: 3000-3009}
    wake: {command: "wake-box", stdin: "secret:wakepw"}
    power: {sleep_after: 30s, wake_timeout: 20s, on_request: wait}
models:
  - name: coder
    runtime: llamacpp
    source: {gguf: /models/coder.gguf}
    categories: [code]
    memory: {vram: 1GiB, layers: 10}
    placement: {node: box}
  - name: helper
    runtime: ollama
    source: {ollama: "helper:1b"}
    categories: [code, chat]
    memory: {vram: 512MiB, layers: 10}
    placement: {node: desk}
gateway: {node: desk, mode: process, host: 127.0.0.1, port: 4000, master_key: "secret:key", config_path: /tmp/x/c.yaml}
routing:
  categories:
    code: {models: [coder, helper]}
"""


def spec() -> ClusterSpec:
    return parse_spec(SPEC, "cluster.yaml").spec


# --------------------------------------------------------------------------- last use


def test_idle_time_counts_from_the_last_change_of_what_the_servers_served() -> None:
    t = IdleTracker()
    assert t.update("box", Usage(("slot0=1",), False), 100.0) == 0.0  # first look: counts from now
    assert t.update("box", Usage(("slot0=1",), False), 110.0) == 10.0
    assert t.update("box", Usage(("slot0=7",), False), 120.0) == 0.0  # the slot took a new task: a use
    assert t.update("box", Usage(("slot0=7",), True), 150.0) == 0.0  # in flight: in use
    assert t.update("box", Usage(("slot0=7",), False), 160.0) == 10.0
    assert t.update("box", Usage((), False, "down"), 170.0) is None  # a server does not answer: unknown
    t.forget("box")
    assert t.update("box", Usage(("slot0=7",), False), 500.0) == 0.0


def test_sleep_is_due_after_sleep_after_with_nothing_in_flight() -> None:
    box = spec().node("box")
    assert sleep_due(box, 29.0, False)[0] is False
    ok, why = sleep_due(box, 31.0, False)
    assert ok and "sleep_after 30 s" in why
    assert sleep_due(box, 300.0, True) == (False, "a request is in flight")
    assert sleep_due(box, None, False)[0] is False


# --------------------------------------------------------------------------- health


def _probe(node: str, kind: str, status: Status, tier: str = "remote") -> Probe:
    return Probe(Endpoint(f"{node}/{kind}", tier, kind, "http://x", 1.0, node), status)


def test_a_node_homelab_put_to_sleep_is_asleep_not_down_and_exits_0() -> None:
    probes = [
        _probe("desk", "ollama", Status.UP, "local"),
        _probe("box", "ssh", Status.DOWN),
        _probe("box", "docker", Status.DOWN),
        _probe("box", "llamacpp", Status.DOWN),
    ]
    before = classify(probes)
    assert before.verdict is Verdict.DEGRADED and {t.tier: t.verdict for t in before.tiers}["remote"] is Verdict.DOWN
    after = mark_asleep(before, {"box"})
    tiers = {t.tier: t.verdict for t in after.tiers}
    assert tiers == {"local": Verdict.HEALTHY, "remote": Verdict.ASLEEP}
    assert after.verdict is Verdict.HEALTHY and EXIT_CODES[after.verdict] == 0
    assert "remote ASLEEP" in after.reason
    # woken (something answers): what answers is itself, the rest is still asleep, the tier is not DOWN
    waking = mark_asleep(classify([*probes[:1], _probe("box", "ssh", Status.UP), *probes[2:]]), {"box"})
    assert {t.tier: t.verdict for t in waking.tiers}["remote"] is Verdict.HEALTHY


# --------------------------------------------------------------------------- power state


def test_the_power_state_is_written_for_homelab_and_next_to_the_gateway_config(tmp_path: Path) -> None:
    store = PowerStore(tmp_path / "state", tmp_path / "litellm")
    store.put("box", "asleep", "idle 31 s", since=123.0)
    assert store.asleep() == {"box"}
    mine = json.loads((tmp_path / "state" / "power.json").read_text())
    assert mine == {"box": {"reason": "idle 31 s", "since": 123.0, "state": "asleep"}}
    assert json.loads((tmp_path / "litellm" / POWER_STATE).read_text()) == mine
    store.put("box", None)
    assert store.asleep() == set() and json.loads((tmp_path / "litellm" / POWER_STATE).read_text()) == {}


def test_a_wake_whose_process_is_gone_is_asleep_again(tmp_path: Path) -> None:
    store = PowerStore(tmp_path / "state")
    store.put("box", WAKING, "homelab wake")
    [record] = store.load().values()
    assert (record["state"], record["pid"]) == (WAKING, os.getpid())  # this process: still waking
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    gone = int(done.stdout)
    path = tmp_path / "state" / "power.json"
    path.write_text(json.dumps({"box": {**record, "pid": gone}}))
    [record] = store.load().values()
    assert record["state"] == ASLEEP
    assert record["reason"] == f"the wake by process {gone} stopped before it finished"
    # another machine's process: not known to be gone
    path.write_text(json.dumps({"box": {**record, "state": WAKING, "pid": gone, "host": "elsewhere"}}))
    assert store.load()["box"]["state"] == WAKING


# --------------------------------------------------------------------------- the gateway's plugin


def test_the_gateway_config_loads_the_power_plugin_for_models_on_nodes_that_sleep() -> None:
    s = spec()
    desired = desired_of(s)
    gw = render_gateway(s, desired.nodes)
    assert gw is not None and gw.text is not None
    assert "homelab_power.handler" in gw.text
    files = dict(gw.files)
    assert POWER_FILE in files
    ns: dict[str, Any] = {"__name__": "homelab_power", "__file__": "/tmp/x/homelab_power.py"}
    exec(compile(files[POWER_FILE], POWER_FILE, "exec"), ns)
    handler = ns["handler"]
    assert handler.directory == "/tmp/x"
    assert handler.nodes["box"]["wake"] == {"command": "wake-box", "stdin": "env:HL_TEST_WAKE"}  # a reference
    assert handler.first["expert/code"] == ["coder"] and handler.fallbacks["expert/code"] == ["helper"]
    assert handler.models["coder"][0][0] == "box" and handler.models["coder"][0][1].endswith("/health")


class _Health:
    """A model server's /health on loopback: 503 until `awake` is set."""

    def __init__(self) -> None:
        self.awake = threading.Event()
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if outer.awake.is_set() else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def health() -> Iterator[_Health]:
    h = _Health()
    yield h
    h.close()


def _handler(tmp_path: Path, health: _Health, on_request: str, command: str) -> PowerHandler:
    config = {
        "nodes": {"box": {"wake": {"command": command, "stdin": "env:HL_TEST_WAKE"}, "wake_timeout": 20,
                          "on_request": on_request}},
        "models": {"coder": [["box", health.url]], "helper": [["desk", "http://127.0.0.1:9/api/tags"]]},
        "first": {"coder": ["coder"], "helper": ["helper"], "expert/code": ["coder"]},
        "fallbacks": {"expert/code": ["helper"], "coder": ["helper"]},
    }  # fmt: skip
    (tmp_path / POWER_STATE).write_text(json.dumps({"box": {"state": "asleep", "since": 5.0}}))
    return PowerHandler(config, directory=str(tmp_path))


def test_ten_concurrent_requests_during_one_wake_send_one_wake_and_wait_for_the_model(
    tmp_path: Path, health: _Health, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HL_TEST_WAKE", "s3cret")
    count, got = tmp_path / "wakes", tmp_path / "stdin"
    # the wake command: counts itself, keeps what it read on stdin, and the node answers 0.5 s later
    command = f"echo wake >> {count}; cat > {got}; sleep 0.5"
    handler = _handler(tmp_path, health, "wait", command)

    async def scenario() -> list[dict[str, Any]]:
        async def wake_when_told() -> None:
            while not count.exists():
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)
            health.awake.set()

        waker = asyncio.ensure_future(wake_when_told())
        bodies = [{"model": "expert/code", "messages": [], "n": i} for i in range(10)]
        done = await asyncio.gather(*(handler.async_pre_call_hook(None, None, b, "completion") for b in bodies))
        await waker
        return list(done)

    answered = asyncio.run(scenario())
    assert [a["model"] for a in answered] == ["expert/code"] * 10  # held, then sent where asked
    assert count.read_text().splitlines() == ["wake"]  # exactly one wake
    assert got.read_text() == "s3cret\n"  # the secret went to stdin, not the command line
    events = [json.loads(line) for line in (tmp_path / POWER_EVENTS).read_text().splitlines()]
    assert [e["event"] for e in events].count("wake-sent") == 1
    held = [e for e in events if e["event"] == "held"]
    assert len(held) == 10 and all(e["awake"] for e in held)


def test_fallback_answers_at_once_while_the_node_wakes(tmp_path: Path, health: _Health) -> None:
    count = tmp_path / "wakes"
    handler = _handler(tmp_path, health, "fallback", f"echo wake >> {count}")

    async def scenario() -> list[Any]:
        first = await asyncio.gather(*(handler.handle({"model": m}) for m in ("expert/code", "coder", "helper")))
        await asyncio.sleep(0.3)  # the wake runs in the background
        return list(first)

    answered = asyncio.run(scenario())
    assert [a["model"] for a in answered] == ["helper", "helper", "helper"]
    assert count.read_text().splitlines() == ["wake"]


class _FakeResponse:
    """What the proxy hands the success hook: LiteLLM's ModelResponse, an object with an OpenAI `model` field."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.choices = [{"message": {"role": "assistant", "content": "hi"}}]


def test_a_fallback_answer_says_which_model_answered(tmp_path: Path, health: _Health) -> None:
    """Issue 28, item 7: a request for `coder` answered by `helper` says `helper` (body and headers)."""
    handler = _handler(tmp_path, health, "fallback", f"echo wake >> {tmp_path / 'wakes'}")

    async def scenario() -> tuple[Any, Any, Any, Any]:
        sent = await handler.async_pre_call_hook(
            None, None, {"model": "coder", "metadata": {"user_api_key": "k"}}, "completion"
        )
        # the proxy restamps the name asked for unless LiteLLM's own flag is set: it is, and ours with it
        assert sent["model"] == "helper"
        assert sent["metadata"]["user_api_key"] == "k" and sent["metadata"]["_complexity_router_return_raw_model_name"]
        answered = await handler.async_post_call_success_hook(sent, None, _FakeResponse("coder"))
        as_dict = await handler.async_post_call_success_hook(sent, None, {"model": "coder", "data": []})
        headers = await handler.async_post_call_response_headers_hook(sent, None, answered, {}, None)
        await asyncio.sleep(0.3)  # the wake runs in the background
        return answered, as_dict, headers, sent

    answered, as_dict, headers, sent = asyncio.run(scenario())
    assert answered.model == "helper" and answered.choices[0]["message"]["content"] == "hi"
    assert as_dict == {"model": "helper", "data": []}
    assert headers == {"x-homelab-model": "helper", "x-homelab-requested-model": "coder"}
    assert fallback_of(sent) == {"requested": "coder", "model": "helper"}


def test_an_answer_from_the_model_asked_for_is_left_alone(tmp_path: Path, health: _Health) -> None:
    handler = _handler(tmp_path, health, "fallback", f"echo wake >> {tmp_path / 'wakes'}")
    (tmp_path / POWER_STATE).write_text("{}")

    async def scenario() -> tuple[Any, Any, Any]:
        sent = await handler.async_pre_call_hook(None, None, {"model": "coder", "metadata": {}}, "completion")
        response = _FakeResponse("coder-served-name")
        answered = await handler.async_post_call_success_hook(sent, None, response)
        return sent, answered, await handler.async_post_call_response_headers_hook(sent, None, response)

    sent, answered, headers = asyncio.run(scenario())
    assert sent == {"model": "coder", "metadata": {}}
    assert answered.model == "coder-served-name" and headers is None


def test_the_mark_goes_where_the_request_keeps_litellm_metadata() -> None:
    sent = mark_fallback({"model": "a", "litellm_metadata": {"x": 1}}, "a", "b")
    assert sent["litellm_metadata"]["homelab_fallback"] == {"requested": "a", "model": "b"} and "metadata" not in sent
    assert fallback_of({"model": "b", "metadata": "not a dict"}) is None
    assert say_who_answered(None, "b") is None and say_who_answered({"data": []}, "b") == {"data": []}


def test_an_awake_node_is_left_alone(tmp_path: Path, health: _Health) -> None:
    handler = _handler(tmp_path, health, "wait", f"echo wake >> {tmp_path / 'wakes'}")
    (tmp_path / POWER_STATE).write_text("{}")
    assert asyncio.run(handler.handle({"model": "expert/code"})) == {"model": "expert/code"}
    assert not (tmp_path / "wakes").exists()


def test_the_plugin_source_runs_standalone() -> None:
    ns: dict[str, Any] = {"__name__": "homelab_power", "__file__": "/nowhere/homelab_power.py"}
    exec(compile(power_plugin_source({"nodes": {}, "models": {}}), POWER_FILE, "exec"), ns)
    assert asyncio.run(ns["handler"].async_pre_call_hook(None, None, {"model": "x"}, "completion")) == {"model": "x"}
    response = _FakeResponse("x")
    assert asyncio.run(ns["handler"].async_post_call_success_hook({"model": "x"}, None, response)) is response


# --------------------------------------------------------------------------- homelab wake


def test_wake_refuses_an_unknown_node_and_a_node_without_wake(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from controller.cli import app

    path = tmp_path / "cluster.yaml"
    path.write_text(SPEC)
    runner = CliRunner()
    unknown = runner.invoke(app, ["wake", "-f", str(path), "--state-dir", str(tmp_path), "nope"])
    assert unknown.exit_code == 1 and "unknown node 'nope' (nodes: desk, box)" in unknown.stderr
    assert "Traceback" not in unknown.output
    nowake = runner.invoke(app, ["wake", "-f", str(path), "--state-dir", str(tmp_path), "desk"])
    assert nowake.exit_code == 1 and "node 'desk' has no `wake` section" in nowake.stderr
