"""Issue 29: what a node answers never crashes or hangs homelab (a hostile HTTP server on loopback).

Every case is generated here and served by `tests.support.hostile_http`: an answer that is not JSON, JSON
of the wrong shape, numbers Python's `json` reads as inf or as a 400-digit integer, a body of 200 MB, one
byte every half second. Before the fix, each of these gave a traceback (AttributeError, OverflowError,
JSONDecodeError) or hung for as long as the server kept trickling, or read the whole body into memory."""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from controller.drivers.base import DriverError
from controller.drivers.httpjson import BadAnswer, bounded_json
from controller.drivers.llamacpp import router_models
from controller.drivers.ollama import OllamaHttp
from controller.effects.importing import gather, probe_spec
from controller.effects.observe import observe_ollama
from specs.errors import HomelabError
from specs.model import Node
from tests.support.hostile_http import HostileServer, Reply, endless, trickle
from tests.support.wiring import Wired

DEADLINE = 1.0
"""The drivers' deadline in these tests; each case must end within it plus `SLACK`."""
SLACK = 2.0
HTML = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
TAG = "qwen2.5:14b"
OURS = "homelab/chat:latest"


def tags(*names: str) -> bytes:
    return json.dumps({"models": [{"name": n, "model": n, "size": 1} for n in names]}).encode()


def show(parameters: str = "num_ctx 8192", details: object = None) -> bytes:
    return json.dumps(
        {"parameters": parameters, "details": details or {"parent_model": TAG}, "model_info": {}}
    ).encode()


GOOD: dict[tuple[str, str], Reply] = {
    ("GET", "/api/version"): Reply(b'{"version": "0.6.0"}'),
    ("GET", "/api/tags"): Reply(tags(TAG, OURS)),
    ("GET", "/api/ps"): Reply(b'{"models": []}'),
    ("POST", "/api/show"): Reply(show()),
}

BIG = 200 << 20
FINE_FOR = {
    "/api/version": {"models-string", "models-objects-without-name", "details-string", "parameters-object"},
    "/api/tags": {"details-string", "parameters-object"},
    "/api/ps": {"details-string", "parameters-object"},
    "/api/show": {"models-string", "models-objects-without-name"},
}


def bad_bodies() -> dict[str, Reply]:
    """Answers no endpoint should get: each is served in turn in place of a good one."""
    return {
        "html": Reply(HTML, content_type="text/html"),
        "html-500": Reply(HTML, 500, "text/html"),
        "list": Reply(b"[1, 2, 3]"),
        "string": Reply(b'"abc"'),
        "null": Reply(b"null"),
        "empty": Reply(b""),
        "truncated": Reply(b'{"models": [{"name": "a"'),
        "binary": Reply(bytes(range(256)) * 4, content_type="application/octet-stream"),
        "nan": Reply(b'{"models": NaN, "details": NaN, "parameters": NaN}'),
        "infinity": Reply(b'{"models": [], "version": Infinity, "model_info": {"x": -Infinity}}'),
        "1e999": Reply(b'{"models": [], "version": 1e999, "model_info": {"llama.block_count": 1e999}}'),
        "10**400": Reply(b'{"models": [], "version": ' + b"1" * 400 + b', "model_info": {"n": ' + b"9" * 400 + b"}}"),
        "deep": Reply(b"[" * 100_000 + b"]" * 100_000),
        "models-string": Reply(b'{"models": "abc"}'),
        "models-objects-without-name": Reply(b'{"models": [1, {"name": 5}, {}]}'),
        "details-string": Reply(b'{"parameters": "num_ctx 8", "details": "abc", "model_info": {}}'),
        "parameters-object": Reply(b'{"parameters": {"num_ctx": 8}, "details": {}, "model_info": []}'),
        "trickle": Reply(trickle(b'{"models": []}' + b" " * 100, 0.3)),
        "big-declared": Reply(endless(b'{"models": [', b'{"name": "x"},' * 1000, BIG), length=BIG),
        "big-chunked": Reply(endless(b'{"models": [', b'{"name": "x"},' * 1000, BIG)),
        "lying-length": Reply(b'{"models": []}', length=1000),
    }


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    with HostileServer() as s:
        yield s


def node(url: str) -> Node:
    return probe_spec("lab", [], [("desk", url)]).node("desk")


def bounded(call: Callable[[], object]) -> tuple[str, object]:
    """Run `call`: ("ok", value) or ("error", the DriverError's message); anything else fails the test. It
    must end within the deadline plus slack, and allocate far less than the 200 MB a node may send."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        outcome: tuple[str, object] = ("ok", call())
    except DriverError as exc:
        outcome = ("error", str(exc))
    finally:
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < DEADLINE + SLACK, (elapsed, outcome)
    assert peak < 64 << 20, (peak, outcome)
    if outcome[0] == "error":
        message = str(outcome[1])
        assert "\n" not in message and len(message) < 400, message
    return outcome


@pytest.mark.parametrize("case", sorted(bad_bodies()))
@pytest.mark.parametrize("route", sorted(GOOD))
def test_an_ollama_answering_garbage_gives_a_one_line_error(
    server: HostileServer, route: tuple[str, str], case: str
) -> None:
    server.serve({**GOOD, route: bad_bodies()[case]})
    driver = OllamaHttp("desk", server.url, timeout=DEADLINE)
    calls: dict[str, Callable[[], object]] = {
        "ping": driver.ping,
        "list_models": driver.list_models,
        "loaded": driver.loaded,
        "derived": lambda: driver.derived(OURS),
        "derived_many": lambda: driver.derived_many([OURS, TAG]),
        "model_info": lambda: driver.model_info(TAG),
    }
    touched = {
        "/api/version": {"ping"},
        "/api/tags": {"list_models"},
        "/api/ps": {"loaded"},
        "/api/show": {"derived", "derived_many", "model_info"},
    }[route[1]]
    for name, call in calls.items():
        kind, value = bounded(call)
        if name in touched:
            # a JSON object that is fine for this endpoint (the fields it reads are absent) is read as such;
            # anything else is an error naming the server
            assert kind == "error" or case in FINE_FOR[route[1]], (name, value)
            if kind == "error":
                assert server.url in str(value), value
    # and what the commands do with it: the node is observed as unreachable, with the reason
    state = bounded(
        lambda: observe_ollama(node(server.url), lambda n: OllamaHttp("desk", server.url, timeout=DEADLINE))
    )
    assert state[0] == "ok"


def test_num_ctx_out_of_range_reads_as_unset(server: HostileServer) -> None:
    for text in ("num_ctx 1e999", "num_ctx nan", "num_ctx -inf", "num_ctx " + "9" * 400, "num_ctx abc"):
        server.serve({**GOOD, ("POST", "/api/show"): Reply(show(text))})
        kind, state = bounded(lambda: OllamaHttp("desk", server.url, timeout=DEADLINE).derived(OURS))
        assert kind == "ok" and getattr(state, "num_ctx", 0) is None, (text, state)


def test_a_trickling_node_is_cut_at_the_deadline_not_per_read(server: HostileServer) -> None:
    server.serve({**GOOD, ("GET", "/api/tags"): Reply(trickle(b" " * 1000, 0.2))})
    start = time.monotonic()
    with pytest.raises(BadAnswer, match=r"no complete answer within 1s"):
        OllamaHttp("desk", server.url, timeout=DEADLINE).list_models()
    assert time.monotonic() - start < DEADLINE + SLACK
    # the sync helper too (llama.cpp's /v1/models, LiteLLM): the deadline plus at most one read
    start = time.monotonic()
    with httpx.Client(trust_env=False) as client, pytest.raises(BadAnswer, match="no complete answer"):
        bounded_json(client, "GET", server.url + "/api/tags", what="x", deadline=DEADLINE)
    assert time.monotonic() - start < DEADLINE + SLACK


def test_a_200_mb_answer_is_refused_without_reading_it(server: HostileServer) -> None:
    for reply in (bad_bodies()["big-declared"], bad_bodies()["big-chunked"]):
        server.serve({**GOOD, ("GET", "/api/tags"): reply})
        kind, message = bounded(OllamaHttp("desk", server.url, timeout=DEADLINE).list_models)
        assert kind == "error" and "larger than" in str(message), message


@pytest.mark.parametrize("case", sorted(bad_bodies()))
def test_a_llama_server_answering_garbage_gives_a_one_line_error(server: HostileServer, case: str) -> None:
    server.serve({("GET", "/v1/models"): bad_bodies()[case]})
    kind, message = bounded(lambda: router_models(server.url, DEADLINE))
    assert kind == "error", message


def spec_text(url: str) -> str:
    return f"""\
cluster: {{name: lab}}
nodes:
  - name: desk
    tier: local
    address: 127.0.0.1
    ram: 32GiB
    ollama: {{url: "{url}"}}
models:
  - name: chat
    runtime: ollama
    source: {{ollama: "{TAG}"}}
    placement: {{node: desk}}
"""


@pytest.mark.parametrize("case", ["html", "models-string", "list", "details-string", "1e999", "trickle"])
def test_commands_with_a_hostile_ollama_say_so_in_one_line(
    server: HostileServer, wired: Wired, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    reply = bad_bodies()[case]
    route = ("POST", "/api/show") if case == "details-string" else ("GET", "/api/tags")
    server.serve({**GOOD, route: reply})
    (tmp_path / "cluster.yaml").write_text(spec_text(server.url))
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    wired.set(ollama=lambda n: OllamaHttp(n.name, server.url, timeout=DEADLINE), gpu_probe=lambda nodes: {})
    spec = str(tmp_path / "cluster.yaml")
    for args in (["status", "-f", spec], ["reconcile", "--dry-run", "-f", spec]):
        start = time.monotonic()
        r = wired.invoke(args)
        assert time.monotonic() - start < 4 * (DEADLINE + SLACK), args
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.exception)
        assert "Traceback" not in r.output, r.output
        assert server.url in r.output, (args, r.output)
    out = tmp_path / "imported.yaml"
    # import: the command raises the driver's error, which the entry point (`cli.main`) prints as one line
    r = wired.invoke(["import", "--from-ollama", f"desk={server.url}", "-o", str(out)])
    assert isinstance(r.exception, HomelabError), r.exception
    message = str(r.exception)
    assert message.startswith("Ollama at " + server.url) and "\n" not in message, message
    assert not out.exists()


def test_import_of_3000_tags_reuses_one_client() -> None:
    names = [f"model-{i}:q4" for i in range(3000)]
    with HostileServer(keep_alive=True) as s:
        s.serve({**GOOD, ("GET", "/api/tags"): Reply(tags(*names))})
        spec = probe_spec("lab", [], [("desk", s.url)])
        start = time.monotonic()
        _, ofacts = gather(spec, lambda n: None, lambda n: OllamaHttp("desk", s.url), [], ["desk"])  # type: ignore[arg-type,return-value]
        elapsed = time.monotonic() - start
    assert [m for m, _ in ofacts[0].models] == sorted(names)
    assert all(ctx == 8192 for _, ctx in ofacts[0].models)
    assert elapsed < 60, elapsed
