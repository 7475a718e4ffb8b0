"""Expert routing: the classifier, its rules from the spec, request parsing, the route choice and `homelab route`."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import typer

from controller.commands.route import register
from controller.core.routing import (
    Classifier,
    Endpoint,
    EndpointHealth,
    RequestError,
    RouteError,
    candidates,
    choose,
    parse_json,
    parse_request,
)
from controller.drivers.fake import FakeDockerNode
from specs import parse_spec
from specs.enums import Category, Runtime, Tier
from specs.model import CategoryRoute, ClassifierRule, ClusterSpec, Routing
from tests.support.ports import free_port
from tests.support.wiring import Wired

DATA = Path(__file__).resolve().parent.parent / "data" / "routing.jsonl"

C = Category


def classify(request: object, routing: Routing | None = None) -> Category:
    return Classifier.from_spec(routing).classify(request).category


# --------------------------------------------------------------------------- classifier: defaults


@pytest.mark.parametrize(
    ("request_", "category", "signal"),
    [
        ("```\nx = 1\n```\nwhy is this slow?", C.CODE, "code fence"),
        ('Traceback (most recent call last):\n  File "a.py", line 3, in <module>\nKeyError: 1', C.CODE, "traceback"),
        ("error[E0382]: borrow of moved value: `v`", C.CODE, "compiler error"),
        ("what does this do in utils.go and server.go", C.CODE, "file name *.go"),
        ("how do I squash commits with git", C.CODE, "keyword 'git'"),
        ("Prove that every finite group of prime order is cyclic.", C.REASON, "keyword 'prove'"),
        ("solve x^2 + 5x + 6 = 0", C.REASON, "equation"),
        ("Think step by step about who sits next to whom at the table.", C.REASON, "keyword 'step by step'"),
        ("A tank holds 40 litres and leaks 3 litres an hour after 2 hours of rain. How long until it is empty?",
         C.REASON, "word problem"),
        ("hello", C.FAST, "keyword 'hello'"),
        ("capital of Peru?", C.FAST, "short prompt: 3 words ≤ 6"),
        ("Why do onions make you cry?", C.CHAT, "keyword 'why'"),
        ("I am thinking about repainting the living room this spring, would sage green go with oak floors?",
         C.CHAT, "default category"),
    ],
)  # fmt: skip
def test_default_signals(request_: str, category: Category, signal: str) -> None:
    got = Classifier.from_spec().classify(request_)
    assert got.category is category, got
    assert any(signal in s for s in got.signals), got.signals


def test_image_means_vision_and_input_means_embed() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "prove this"}, {"type": "image_url"}]}]}
    got = Classifier.from_spec().classify(body)
    assert got.category is C.VISION
    assert got.signals == ("1 image part in the messages",)
    assert classify({"input": "def f(): pass"}) is C.EMBED


def test_greeting_in_a_long_message_is_not_fast() -> None:
    text = "Hi! I have a question about planting tomatoes on a balcony that gets afternoon sun only."
    assert classify(text) is C.CHAT


def test_system_prompt_is_weak_context() -> None:
    body = {"messages": [{"role": "system", "content": "You are a Python expert."}, {"role": "user", "content": "x"}]}
    got = Classifier.from_spec().classify(body)
    assert got.scores[C.CODE] == pytest.approx(0.25)
    assert got.category is C.FAST  # one weak hint does not win; the message itself is one word


def test_deterministic_and_explained() -> None:
    c = Classifier.from_spec()
    text = "Write a bash script with a for loop over *.log files"
    assert c.classify(text) == c.classify(text)
    assert c.classify(text).signals[:2] == ("keyword 'bash'", "keyword 'script'")


# --------------------------------------------------------------------------- classifier: rules from the spec


def test_spec_keywords_patterns_extensions() -> None:
    routing = Routing(
        rules={
            C.CODE: ClassifierRule(keywords=["homelab reconcile"], patterns=[r"\bHL-\d+\b"], file_extensions=[".j2"]),
        }
    )
    c = Classifier.from_spec(routing)
    assert c.classify("what does homelab reconcile do to my box").category is C.CODE
    assert "keyword 'homelab reconcile'" in c.classify("what does homelab reconcile do to my box").signals
    assert c.classify("look at ticket HL-42 please, it is about the garden").category is C.CODE
    assert c.classify("my hosts.j2 is weird and I do not understand the output").category is C.CODE
    assert classify("my hosts.j2 is weird and I do not understand the output") is C.CHAT


def test_replace_defaults_and_weight() -> None:
    text = "how do I squash commits with git"
    replaced = Routing(rules={C.CODE: ClassifierRule(keywords=["terraform"], replace_defaults=True)})
    assert classify(text, replaced) is C.CHAT
    assert classify("terraform plan fails", replaced) is C.CODE
    # a weight below the threshold makes one keyword too weak to win on its own
    weak = Routing(rules={C.REASON: ClassifierRule(keywords=["ponder"], weight=0.5)})
    assert classify("ponder about the meaning of this old song my grandmother sang", weak) is C.CHAT
    strong = Routing(rules={C.REASON: ClassifierRule(keywords=["ponder"], weight=2.0)})
    got = Classifier.from_spec(strong).classify("ponder about the meaning of this old song my grandmother sang")
    assert got.category is C.REASON
    assert got.scores[C.REASON] == pytest.approx(2.0)


def test_default_category_and_fast_max_words() -> None:
    # a conversational word is too weak to win: with nothing stronger, the default category serves
    assert classify("tell me something", Routing(default_category=C.FAST)) is C.FAST
    long_plain = "the weather here has been very grey this whole week"
    assert classify(long_plain, Routing(default_category=C.REASON)) is C.REASON
    assert classify("capital of Peru?", Routing(fast_max_words=2)) is C.CHAT
    assert classify("capital of Peru?", Routing(fast_max_words=0)) is C.CHAT


def test_bad_spec_pattern_is_one_line() -> None:
    from controller.core.routing import _Rule

    with pytest.raises(RequestError, match=r"^routing.rules.code: bad pattern '\(': ") as info:
        Classifier({C.CODE: [_Rule(C.CODE, patterns=(("x", "(", ()),))]})
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("body", "text", "context", "images", "embed"),
    [
        ("just text", "just text", "", 0, False),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "user", "content": "c"}]}, "c", "a", 0, False),
        ({"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": [
            {"type": "text", "text": "t1"}, {"type": "input_text", "text": "t2"},
            {"type": "input_image", "image_url": "u"}]}]},
         "t1\nt2", "sys", 1, False),
        ({"system": [{"type": "text", "text": "anthropic sys"}], "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "data": "x"}}]}]}, "", "anthropic sys", 1, False),
        ({"prompt": ["line one", "line two"]}, "line one\nline two", "", 0, False),
        ({"prompt": "p", "system": "s"}, "p", "s", 0, False),
        ({"input": ["a", "b"]}, "a\nb", "", 0, True),
        ({"input": [[1, 2], [3]]}, "", "", 0, True),
        ({"input": [1, 2, 3]}, "", "", 0, True),
    ],
)  # fmt: skip
def test_parse_shapes(body: object, text: str, context: str, images: int, embed: bool) -> None:
    parsed = parse_request(body)
    assert (parsed.text, parsed.context, parsed.images, parsed.embed) == (text, context, images, embed)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", "empty prompt"),
        ("   \n", "empty prompt"),
        ({}, "request body has no `messages`, `prompt` or `input`"),
        ({"messages": []}, "messages: must be a non-empty list"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "messages: no message with role `user`"),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages[0]: the last user message is empty"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content: must be a string or a list"),
        ({"messages": ["hi"]}, "messages[0]: must be an object"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
         "content[0].text: must be a string"),
        ({"input": ""}, "input: the embeddings input is empty"),
        ({"input": []}, "input: the embeddings input is empty"),
        ({"input": [1, "a"]}, "input: must be a string, a list of strings, or token ids"),
        ({"prompt": 3}, "prompt: must be a string or a list of strings"),
        ({"prompt": ""}, "prompt: empty prompt"),
        (42, "a request must be a prompt or a JSON object, not int"),
    ],
)  # fmt: skip
def test_bad_requests(body: object, message: str) -> None:
    with pytest.raises(RequestError) as info:
        Classifier.from_spec().classify(body)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_json() -> None:
    with pytest.raises(RequestError, match=r"^malformed JSON request: Expecting .* at line 1 column \d+$"):
        parse_json('{"messages": [')


# --------------------------------------------------------------------------- accuracy on the labelled set


def _rows() -> list[dict[str, object]]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_data_set_covers_every_category() -> None:
    rows = _rows()
    assert len(rows) >= 150
    assert {r["category"] for r in rows} == {c.value for c in Category}


@pytest.mark.parametrize("split", ["all", "holdout"])
def test_accuracy_at_least_90_percent(split: str) -> None:
    rows = [r for r in _rows() if split == "all" or r["split"] == split]
    c = Classifier.from_spec()
    right = sum(c.classify(r["request"]).category.value == r["category"] for r in rows)
    assert right / len(rows) >= 0.90, f"{right}/{len(rows)}"


# --------------------------------------------------------------------------- choice

SPEC = """\
version: 1
cluster: {name: t}
nodes:
  - name: box
    tier: local
    address: 127.0.0.1
    ram: 64GiB
    gpus: [{index: 0, name: g, vram: 24GiB}]
    docker: {endpoint: "unix:///var/run/docker.sock"}
    llamacpp: {image: img, ports: 1024-65535, volume: v}
    ollama: {url: "http://127.0.0.1:9"}
models:
  - {name: coder-7b, runtime: llamacpp, source: {gguf: /m/c7.gguf}, categories: [code], priority: 90,
     memory: {vram: 5GiB}, port: PORT_A}
  - {name: coder-1b, runtime: llamacpp, source: {gguf: /m/c1.gguf}, categories: [code, fast], priority: 60,
     memory: {vram: 1GiB}, port: PORT_B}
  - {name: chat-14b, runtime: llamacpp, source: {gguf: /m/q14.gguf}, categories: [chat], priority: 80,
     memory: {vram: 9GiB}, port: PORT_C}
  - {name: tiny, runtime: ollama, source: {ollama: "qwen2.5:0.5b"}, categories: [fast], memory: {vram: 1GiB}}
  - {name: embedder, runtime: ollama, source: {ollama: nomic-embed-text}, categories: [embed], priority: 70,
     memory: {vram: 1GiB}}
  - {name: embedder-2, runtime: ollama, source: {ollama: all-minilm}, categories: [embed], priority: 20,
     memory: {vram: 1GiB}}
routing:
  categories:
    code: {models: [coder-7b, coder-1b], fallback: chat}
    chat: {models: [chat-14b], fallback: fast}
    fast: {models: [tiny, coder-1b]}
"""


def spec_text(a: int = 3001, b: int = 3002, c: int = 3003) -> str:
    return SPEC.replace("PORT_A", str(a)).replace("PORT_B", str(b)).replace("PORT_C", str(c))


@pytest.fixture
def spec() -> ClusterSpec:
    return parse_spec(spec_text()).spec


def ep(model: str, port: int = 3000, runtime: Runtime = Runtime.LLAMACPP) -> Endpoint:
    url = f"http://127.0.0.1:{port}"
    return Endpoint(model, "box", Tier.LOCAL, runtime, f"{url}/v1", f"{url}/health", model)


ENDPOINTS = {
    "coder-7b": (ep("coder-7b", 3001),),
    "coder-1b": (ep("coder-1b", 3002),),
    "chat-14b": (ep("chat-14b", 3003),),
    "tiny": (ep("tiny", 9, Runtime.OLLAMA),),
    "embedder": (ep("embedder", 9, Runtime.OLLAMA),),
    "embedder-2": (ep("embedder-2", 9, Runtime.OLLAMA),),
}


def test_first_choice(spec: ClusterSpec) -> None:
    r = choose(spec, C.CODE, ENDPOINTS)
    assert (r.model, r.category, r.fallback_used, r.gateway_model) == ("coder-7b", C.CODE, False, "expert/code")
    assert r.reason == "coder-7b on box: first choice for code"


def test_preferred_model_down_picks_next_and_says_so(spec: ClusterSpec) -> None:
    health = {"coder-7b": EndpointHealth(False, "connection refused")}
    r = choose(spec, C.CODE, ENDPOINTS, health)
    assert (r.model, r.category, r.fallback_used) == ("coder-1b", C.CODE, True)
    assert r.reason == "coder-7b is down (on box: connection refused); using coder-1b on box"
    assert [(s.model, s.why) for s in r.skipped] == [("coder-7b", "down (on box: connection refused)")]


def test_whole_category_down_falls_back(spec: ClusterSpec) -> None:
    down = {"coder-7b": False, "coder-1b": False}
    r = choose(spec, C.CODE, ENDPOINTS, down)
    assert (r.model, r.requested, r.category, r.gateway_model) == ("chat-14b", C.CODE, C.CHAT, "expert/chat")
    assert r.fallback_used
    assert "no code model is up, falling back to chat: using chat-14b on box" in r.reason


def test_fallback_chain_guards_cycles_and_tries_each_model_once(spec: ClusterSpec) -> None:
    # code → chat → fast → chat: validation refuses the cycle, choose() must not loop on it anyway;
    # coder-1b is in code and in fast but is tried once
    routes = dict(spec.routing.categories)
    routes[C.FAST] = CategoryRoute(models=["tiny", "coder-1b"], fallback=C.CHAT)
    spec = spec.model_copy(update={"routing": Routing(categories=routes)})
    assert candidates(spec, C.CODE) == [
        (C.CODE, "coder-7b"),
        (C.CODE, "coder-1b"),
        (C.CHAT, "chat-14b"),
        (C.FAST, "tiny"),
    ]
    with pytest.raises(RouteError, match=r"^no healthy model for 'code' \(tried code → chat → fast\): coder-7b is"):
        choose(spec, C.CODE, ENDPOINTS, lambda e: EndpointHealth(False, "connection refused"))


def test_unplaced_skipped_and_category_without_route(spec: ClusterSpec) -> None:
    partial = {k: v for k, v in ENDPOINTS.items() if k != "coder-7b"}
    r = choose(spec, C.CODE, partial)
    assert r.model == "coder-1b"
    assert r.reason.startswith("coder-7b is not placed; using coder-1b")
    # embed has no routing entry: models listing it, by priority
    assert choose(spec, C.EMBED, ENDPOINTS).model == "embedder"
    assert choose(spec, C.EMBED, ENDPOINTS, {"embedder": False}).model == "embedder-2"
    with pytest.raises(RouteError, match=r"^no model serves 'vision'"):
        choose(spec, C.VISION, ENDPOINTS)


def test_health_by_url_and_unknown_is_healthy(spec: ClusterSpec) -> None:
    assert choose(spec, C.CODE, ENDPOINTS, {"http://127.0.0.1:3001/health": False}).model == "coder-1b"
    assert choose(spec, C.CODE, ENDPOINTS, lambda e: None).model == "coder-7b"


def test_endpoints_from_render(spec: ClusterSpec) -> None:
    from tests.support.wiring import endpoints_of

    eps = endpoints_of(spec)
    assert eps["coder-7b"][0].url == "http://127.0.0.1:3001/v1"
    assert eps["coder-7b"][0].health_url == "http://127.0.0.1:3001/health"
    assert eps["tiny"][0].url == "http://127.0.0.1:9"
    assert eps["tiny"][0].health_url == "http://127.0.0.1:9/api/tags"
    assert eps["tiny"][0].served_model == "homelab/tiny:latest"


# --------------------------------------------------------------------------- CLI


def app() -> typer.Typer:
    a = typer.Typer()

    @a.callback()
    def _root() -> None:
        """Test root."""

    register(a)
    return a


@pytest.fixture
def spec_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wired: Wired) -> Path:
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    # `homelab route` (with health checks) observes the llama.cpp nodes' Docker engines: an empty fake one
    wired.set(connect=lambda spec: lambda node: FakeDockerNode(node.name))
    f = tmp_path / "cluster.yaml"
    f.write_text(spec_text())
    return f


def test_cli_json_no_health(spec_file: Path, wired: Wired) -> None:
    r = wired.invoke(["route", "-f", str(spec_file), "--json", "--no-health", "fix my Makefile please"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert {k: doc[k] for k in ("category", "model", "node", "tier", "url", "gateway_model", "fallback_used")} == {
        "category": "code",
        "model": "coder-7b",
        "node": "box",
        "tier": "local",
        "url": "http://127.0.0.1:3001/v1",
        "gateway_model": "expert/code",
        "fallback_used": False,
    }
    assert doc["reason"] == "coder-7b on box: first choice for code"


def test_cli_request_from_stdin(spec_file: Path, wired: Wired) -> None:
    body = json.dumps({"model": "auto", "input": ["a", "b"]})
    r = wired.invoke(["route", "-f", str(spec_file), "--no-health", "--request", "-"], input=body)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("embed → embedder on box (local)")


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["--request", "-"], '{"messages": [', "error: stdin: malformed JSON request: Expecting"),
        (["--request", "-"], "", "error: stdin: empty request"),
        (["--request", "-"], '{"messages": []}', "error: messages: must be a non-empty list"),
        (["  "], None, "error: empty prompt"),
        ([], None, "error: give a prompt, or --request FILE"),
        (["hi", "--request", "-"], "{}", "error: give a prompt or --request, not both"),
        (["--request", "/nonexistent/body.json"], None, "error: /nonexistent/body.json: cannot read"),
        (["describe a picture"], None, ""),  # vision: no route configured
    ],
)
def test_cli_errors_are_one_line(
    spec_file: Path, args: list[str], stdin: str | None, message: str, wired: Wired
) -> None:
    if not message:
        args = ["--request", "-"]
        stdin = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
        message = "error: no model serves 'vision'"
    r = wired.invoke(["route", "-f", str(spec_file), "--no-health", *args], input=stdin)
    assert r.exit_code == 1
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert r.output.startswith(message), r.output
    assert r.output.count("\n") == 1, r.output


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["--request", "-"], '{"messages": [', "stdin: malformed JSON request: Expecting"),
        (["--request", "-"], "", "stdin: empty request"),
        (["--request", "-"], '{"messages": []}', "messages: must be a non-empty list"),
        ([], None, "give a prompt, or --request FILE"),
        (["--request", "/nonexistent/body.json"], None, "/nonexistent/body.json: cannot read"),
        (["--request", "-"], '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
         "no model serves 'vision'"),
    ],
)  # fmt: skip
def test_cli_json_errors_are_json(
    spec_file: Path, args: list[str], stdin: str | None, message: str, wired: Wired
) -> None:
    """`route --json` with an error: one JSON object `{"error": ...}` on stdout, exit 1 (issue 28, item 9)."""
    r = wired.invoke(["route", "-f", str(spec_file), "--no-health", "--json", *args], input=stdin)
    assert r.exit_code == 1
    assert r.exception is None or isinstance(r.exception, SystemExit)
    doc = json.loads(r.stdout)
    assert list(doc) == ["error"] and doc["error"].startswith(message), r.stdout
    assert r.stderr == ""


def test_cli_json_spec_errors_are_json(tmp_path: Path, wired: Wired) -> None:
    f = tmp_path / "cluster.yaml"
    f.write_text(spec_text().replace("fast: {models: [tiny, coder-1b]}", "quick: {models: [tiny]}"))
    r = wired.invoke(["route", "-f", str(f), "--no-health", "--json", "hi"])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["error"] == f"1 error in {f}"
    [diagnostic] = doc["diagnostics"]
    assert "routing.categories" in diagnostic and "quick" in diagnostic


def test_cli_unknown_category_in_spec(tmp_path: Path, wired: Wired) -> None:
    f = tmp_path / "cluster.yaml"
    f.write_text(spec_text().replace("fast: {models: [tiny, coder-1b]}", "quick: {models: [tiny]}"))
    r = wired.invoke(["route", "-f", str(f), "--no-health", "hi"])
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    assert "routing.categories" in r.output and "quick" in r.output


# --------------------------------------------------------------------------- real probe on loopback


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.server.status if self.path in ("/health", "/v1/models") else 404  # type: ignore[attr-defined]
        body = b'{"status": "ok"}' if code == 200 else b'{"error": {"code": 503, "message": "Loading model"}}'
        if self.path == "/v1/models" and code == 200:  # llama-server lists its --alias
            body = json.dumps({"object": "list", "data": [{"id": self.server.alias}]}).encode()  # type: ignore[attr-defined]
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def llama_stand_ins() -> Iterator[tuple[int, int]]:
    """Two stand-ins for llama-server's `/health` and `/v1/models`: coder-7b still loading (503), coder-1b
    ready (200)."""
    servers = []
    for status, alias in ((503, "coder-7b"), (200, "coder-1b")):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
        server.status = status  # type: ignore[attr-defined]
        server.alias = alias  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield servers[0].server_address[1], servers[1].server_address[1]
    for server in servers:
        server.shutdown()
        server.server_close()


def test_cli_probes_candidates(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    llama_stand_ins: tuple[int, int],
    wired: Wired,
) -> None:
    loading, ready = llama_stand_ins
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    wired.set(connect=lambda spec: lambda node: FakeDockerNode(node.name))
    f = tmp_path / "cluster.yaml"
    f.write_text(spec_text(loading, ready, free_port()))
    r = wired.invoke(["route", "-f", str(f), "--json", "write a python function that adds two numbers"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["model"] == "coder-1b"
    assert doc["url"] == f"http://127.0.0.1:{ready}/v1"
    assert doc["fallback_used"] is True
    assert doc["reason"] == "coder-7b is down (on box: loading the model); using coder-1b on box"
    cache = json.loads((tmp_path / "state" / "route-health.json").read_text())
    assert cache[f"http://127.0.0.1:{loading}/health"]["ok"] is False
    assert cache[f"http://127.0.0.1:{ready}/health"]["ok"] is True


def test_probe_refused_and_cache(tmp_path: Path) -> None:
    from controller.effects.route_probe import HealthCache, Probed, probe

    spec = parse_spec(spec_text()).spec
    dead = ep("coder-7b", free_port())
    clock = [1000.0]
    cache = HealthCache(tmp_path / "c.json", ttl=30.0, clock=lambda: clock[0])
    got = probe(spec, [dead], cache)
    assert got[dead] == EndpointHealth(False, "Connection refused")  # as `homelab health` says it
    # a fresh cached answer is used instead of probing
    cache.results[dead.health_url] = Probed(True, at=clock[0])
    assert probe(spec, [dead], cache)[dead].healthy
    clock[0] += 31.0
    assert not probe(spec, [dead], cache)[dead].healthy


def test_endpoints_follow_the_running_containers_ports() -> None:
    """A container that kept another port (the cluster grew model by model) is routed to where it listens."""
    from dataclasses import replace

    spec = parse_spec(spec_text().replace(", port: 3001}", "}")).spec  # coder-7b: any free port

    from controller.core.desired import render
    from controller.core.state import ClusterState, NodeState
    from solver.gguf import read_header
    from solver.place import SolveParams, place
    from solver.profiles import profiles_for
    from tests.support.wiring import endpoints_of

    desired = render(spec, place(spec, profiles_for(spec, read_header=read_header), params=SolveParams(time_limit=5)))
    running = {}
    for name, node in desired.nodes.items():
        moved = []
        for c in node.containers:
            assert c.config is not None
            if c.model == "coder-7b":
                c = replace(c, config=replace(c.config, port=3007))
            moved.append(c)
        running[name] = NodeState(node=name, containers=tuple(moved))
    eps = endpoints_of(spec, ClusterState(spec.cluster.name, running))
    assert eps["coder-7b"][0].url == "http://127.0.0.1:3007/v1"
    assert endpoints_of(spec)["coder-7b"][0].url == "http://127.0.0.1:1024/v1"  # from scratch: the lowest free
