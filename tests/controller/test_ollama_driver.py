"""The Ollama driver against the Ollama stand-in (tests/support/ollama_standin.py), and the stand-in's API shapes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from controller.core.state import GatewayState, OllamaModelState
from controller.drivers.base import DriverError, NodeUnreachable
from controller.drivers.ollama import OllamaHttp, parse_parameters
from solver.estimate import shape_from_model_info
from tests.support.ollama_standin import API_VERSION, OllamaStandin
from tests.support.ports import free_port
from tests.support.synth import shape_by_name, write_synth_gguf


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synth_gguf(tmp_path_factory.mktemp("reg") / "tiny.gguf", shape_by_name("mha-f16"))


@pytest.fixture
def standin(gguf: Path) -> Iterator[OllamaStandin]:
    with OllamaStandin({"tiny:1b": gguf, "other": gguf}) as s:
        yield s


def derived(base: str = "tiny:1b", num_gpu: int = 3, num_ctx: int = 512) -> OllamaModelState:
    return OllamaModelState("n", "homelab/x:latest", "x", base, num_gpu, num_ctx)


def test_pull_create_show_preload_delete(standin: OllamaStandin) -> None:
    d = OllamaHttp("n", standin.url)
    d.ping()
    assert d.list_models() == []
    seen: list[tuple[int, int]] = []
    d.pull("tiny:1b", lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] == standin.registry["tiny:1b"].stat().st_size
    assert [a for a, _ in seen] == sorted(a for a, _ in seen) and len(seen) >= 2
    d.create(derived())
    assert d.list_models() == ["homelab/x:latest", "tiny:1b"]
    assert d.derived("homelab/x:latest") == derived()
    assert d.loaded() == []
    d.preload("homelab/x:latest", 1800)
    assert d.loaded() == ["homelab/x:latest"]
    d.create(derived(num_ctx=1024))  # re-created: unloaded, new parameters
    assert d.derived("homelab/x:latest").num_ctx == 1024 and d.loaded() == []
    d.delete("homelab/x:latest")
    d.delete("homelab/x:latest")  # already gone: fine
    assert d.list_models() == ["tiny:1b"]


def test_model_info_feeds_the_estimator(standin: OllamaStandin) -> None:
    d = OllamaHttp("n", standin.url)
    d.pull("tiny:1b")
    info = d.model_info("tiny:1b")
    shape = shape_from_model_info(info["model_info"], "F16")  # type: ignore[arg-type]
    assert shape.arch == "llama" and len(shape.layers) == 4 and shape.n_embd == 256


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda s: None, "pull nope:1b: pull model manifest: file does not exist"),
        (
            lambda s: s.drop_pull.add("nope:1b") or s.registry.__setitem__("nope:1b", s.registry["tiny:1b"]),
            "pull nope:1b: connection dropped before Ollama finished (last status: pulling ",
        ),
    ],
    ids=["unknown-tag", "connection-dropped"],
)
def test_a_failed_pull_is_one_clear_line_and_leaves_nothing(
    standin: OllamaStandin, setup: object, message: str
) -> None:
    setup(standin)  # type: ignore[operator]
    with pytest.raises(DriverError) as err:
        OllamaHttp("n", standin.url).pull("nope:1b")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert OllamaHttp("n", standin.url).list_models() == []


def test_create_errors_leave_no_model(standin: OllamaStandin) -> None:
    d = OllamaHttp("n", standin.url)
    with pytest.raises(DriverError, match=r"create homelab/x:latest from tiny:1b: model 'tiny:1b' not found"):
        d.create(derived())
    d.pull("tiny:1b")
    standin.fail_create.add("homelab/x:latest")
    with pytest.raises(DriverError, match="no space left on device"):
        d.create(derived())
    assert d.list_models() == ["tiny:1b"]


def test_unreachable_is_node_unreachable() -> None:
    with pytest.raises(NodeUnreachable, match=r"Ollama at http://127.0.0.1:\d+ does not answer"):
        OllamaHttp("n", f"http://127.0.0.1:{free_port()}").list_models()


def test_parameters_text() -> None:
    text = 'num_ctx                        8192\nnum_gpu                        28\nstop    "<|im_end|>"'
    assert parse_parameters(text) == {"num_ctx": ["8192"], "num_gpu": ["28"], "stop": ["<|im_end|>"]}


# ------------------------------------------------------------------ the stand-in speaks Ollama's API


def test_standin_json_shapes_and_status_codes(standin: OllamaStandin) -> None:
    with httpx.Client(base_url=standin.url, trust_env=False) as c:
        assert c.get("/api/version").json() == {"version": API_VERSION}
        r = c.post("/api/show", json={"model": "nope"})
        assert (r.status_code, r.json()) == (404, {"error": "model 'nope:latest' not found"})
        r = c.request("DELETE", "/api/delete", json={"model": "nope"})
        assert (r.status_code, r.json()) == (404, {"error": "model 'nope:latest' not found"})
        r = c.post("/api/pull", json={"model": "nope", "stream": False})
        assert (r.status_code, r.json()) == (500, {"error": "pull model manifest: file does not exist"})
        r = c.post("/api/pull", json={"model": "other"})
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert lines[0] == {"status": "pulling manifest"}
        assert set(lines[1]) == {"status", "digest", "total", "completed"} and lines[1]["digest"].startswith("sha256:")
        assert [e["status"] for e in lines[-3:]] == ["verifying sha256 digest", "writing manifest", "success"]
        tags = c.get("/api/tags").json()["models"]
        assert [t["name"] for t in tags] == ["other:latest"]
        assert set(tags[0]) == {"name", "model", "modified_at", "size", "digest", "details"}
        assert set(tags[0]["details"]) >= {"format", "family", "parameter_size", "quantization_level"}
        r = c.post("/api/create", json={"model": "mine", "from": "other", "parameters": {"num_ctx": 256}})
        assert [json.loads(line)["status"] for line in r.text.splitlines()][-2:] == ["writing manifest", "success"]
        show = c.post("/api/show", json={"model": "mine"}).json()
        assert show["details"]["parent_model"] == "other:latest"
        assert parse_parameters(show["parameters"]) == {"num_ctx": ["256"]}
        assert show["model_info"]["general.architecture"] == "llama"
        assert show["model_info"]["llama.block_count"] == 4
        assert show["model_info"]["tokenizer.ggml.tokens"] == []  # as without verbose
        r = c.post("/api/generate", json={"model": "mine", "keep_alive": -1})
        assert r.json()["done"] is True and r.json()["done_reason"] == "load"
        ps = c.get("/api/ps").json()["models"]
        assert [m["name"] for m in ps] == ["mine:latest"] and {"expires_at", "size_vram"} <= set(ps[0])
        r = c.post("/api/chat", json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and "not found" in r.json()["error"]


class FakeLlama:
    """A llama-server's `/apply-template` and streaming `/completion`, on 127.0.0.1 (no real llama-server in unit
    tests): the answer is ANSWER's words, one SSE event per token, cut at `n_predict` (`stop_type: limit`)."""

    ANSWER = ("Paris", " is", " the", " capital", ".")

    def __init__(self) -> None:
        self.prompts: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/apply-template":
                    prompt = "".join(f"<{m['role']}>{m['content']}" for m in body["messages"]) + "<model>"
                    payload = json.dumps({"prompt": prompt}).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                assert self.path == "/completion" and body["stream"] is True
                fake.prompts.append(body["prompt"])
                n = int(body["n_predict"])
                words = fake.ANSWER[:n]
                events = [{"content": w, "stop": False} for w in words]
                limit = n < len(fake.ANSWER)
                events.append({"content": "", "stop": True, "stop_type": "limit" if limit else "eos",
                               "tokens_evaluated": 7, "tokens_predicted": len(words)})  # fmt: skip
                data = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def talking(gguf: Path) -> Iterator[OllamaStandin]:
    """A stand-in answering through FakeLlama, with `tiny:1b` present."""
    fake = FakeLlama()
    try:
        with OllamaStandin({"tiny:1b": gguf}, llama_url=fake.url) as s:
            s.add_local("tiny:1b")
            yield s
    finally:
        fake.close()


@pytest.fixture
def client(talking: OllamaStandin) -> Iterator[ollama.Client]:
    """The real `ollama` Python client, talking to the stand-in."""
    with ollama.Client(host=talking.url, trust_env=False) as c:
        yield c


def test_generate_and_chat_stream_token_by_token_through_the_ollama_client(
    talking: OllamaStandin, client: ollama.Client
) -> None:
    parts = list(client.generate(model="tiny:1b", prompt="Capital of France?", stream=True))
    assert [p.response for p in parts[:-1]] == list(FakeLlama.ANSWER) and not any(p.done for p in parts[:-1])
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].response == ""
    assert (parts[-1].prompt_eval_count, parts[-1].eval_count) == (7, 5)
    chat = list(client.chat(model="tiny:1b", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert [c.message.content for c in chat[:-1]] == list(FakeLlama.ANSWER) and chat[-1].done
    assert all(c.message.role == "assistant" for c in chat)
    whole = client.chat(model="tiny:1b", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 2})
    assert whole.message.content == "Paris is" and whole.done_reason == "length" and whole.eval_count == 2
    with httpx.Client(base_url=talking.url, trust_env=False) as c:  # the default is a stream, as in Ollama
        r = c.post("/api/generate", json={"model": "tiny:1b", "prompt": "x"})
        assert r.headers["content-type"] == "application/x-ndjson" and len(r.text.splitlines()) == 6


def test_ps_embed_and_unknown_models_through_the_ollama_client(talking: OllamaStandin, client: ollama.Client) -> None:
    assert client.ps().models == []
    client.generate(model="tiny:1b", prompt="x", keep_alive="10m", stream=False)
    (running,) = client.ps().models
    size = talking.registry["tiny:1b"].stat().st_size
    assert (running.model, running.size, running.size_vram) == ("tiny:1b", size, size)
    assert running.expires_at is not None
    left = (running.expires_at - datetime.now(UTC)).total_seconds()
    assert 590 < left <= 600
    one = client.embed(model="tiny:1b", input="hello")
    two = client.embed(model="tiny:1b", input=["hello", "world"])
    assert len(one.embeddings) == 1 and len(two.embeddings) == 2 and two.embeddings[0] == one.embeddings[0]
    assert len(one.embeddings[0]) == 256 and abs(sum(v * v for v in one.embeddings[0]) - 1) < 1e-6
    assert two.embeddings[0] != two.embeddings[1]
    for call in (
        lambda: client.chat(model="nope", messages=[{"role": "user", "content": "hi"}]),
        lambda: list(client.generate(model="nope", prompt="x", stream=True)),
        lambda: client.embed(model="nope", input="x"),
    ):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert (err.value.status_code, err.value.error) == (404, "model 'nope' not found")


def test_the_openai_routes_through_the_openai_client(talking: OllamaStandin) -> None:
    http = openai.DefaultHttpxClient(trust_env=False)
    with openai.OpenAI(base_url=f"{talking.url}/v1", api_key="ollama", http_client=http) as c:
        openai_routes(talking, c)


def openai_routes(talking: OllamaStandin, client: openai.OpenAI) -> None:
    msgs: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Capital of France?"}]
    done = client.chat.completions.create(model="tiny:1b", messages=msgs)
    assert done.object == "chat.completion" and done.model == "tiny:1b"
    assert done.choices[0].message.content == "Paris is the capital." and done.choices[0].finish_reason == "stop"
    assert done.usage is not None and (done.usage.prompt_tokens, done.usage.completion_tokens) == (7, 5)
    chunks = list(client.chat.completions.create(model="tiny:1b", messages=msgs, stream=True, max_tokens=3))
    assert [c.choices[0].delta.content for c in chunks] == ["Paris", " is", " the", ""]
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "length"]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    text = client.completions.create(model="tiny:1b", prompt="Capital of France?", max_tokens=2)
    assert text.object == "text_completion" and text.choices[0].text == "Paris is"
    pieces = list(client.completions.create(model="tiny:1b", prompt="x", stream=True))
    assert "".join(p.choices[0].text for p in pieces) == "Paris is the capital."
    emb = client.embeddings.create(model="tiny:1b", input=["a", "b"])
    assert [d.index for d in emb.data] == [0, 1] and len(emb.data[0].embedding) == 256
    assert [m.id for m in client.models.list()] == ["tiny:1b"]
    assert client.models.retrieve("tiny:1b").owned_by == "library"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=msgs)
    assert err.value.status_code == 404 and err.value.body == {
        "message": "model 'nope' not found", "type": "not_found_error", "param": None, "code": None,
    }  # fmt: skip
    with httpx.Client(base_url=talking.url, trust_env=False) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny:1b", "messages": msgs, "stream": True})
        assert r.headers["content-type"] == "text/event-stream" and r.text.endswith("data: [DONE]\n\n")


def test_no_llama_server_is_ollamas_500(talking: OllamaStandin) -> None:
    talking.llama_url = f"http://127.0.0.1:{free_port()}"
    with httpx.Client(base_url=talking.url, trust_env=False) as c:
        r = c.post("/api/chat", json={"model": "tiny:1b", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 500 and r.json()["error"].startswith("llama runner: ")
        r = c.post("/v1/completions", json={"model": "tiny:1b", "prompt": "hi"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"


# ------------------------------------------------------------------ the local gateway driver


def test_local_gateway_writes_atomically_and_keeps_the_previous_file(tmp_path: Path) -> None:
    from controller.drivers.litellm import LocalGateway
    from controller.drivers.secrets import resolve_secret

    path = tmp_path / "litellm" / "config.yaml"
    gw = GatewayState("external", str(path), "a: 1\n", f"http://127.0.0.1:{free_port()}")
    driver = LocalGateway(gw, tmp_path / "state")
    assert driver.read_config() is None
    driver.write_config(gw)
    driver.write_config(replace(gw, text="a: 2\n"))
    assert path.read_text() == "a: 2\n" and (tmp_path / "litellm" / "config.yaml.bak").read_text() == "a: 1\n"
    driver.wait_live(gw, 1.0)  # external and not listening: not checked, not an error
    assert not driver.alive()
    with pytest.raises(DriverError, match="gateway mode container is not supported yet"):
        driver.write_config(replace(gw, mode="container"))
    with pytest.raises(DriverError, match="restarting the proxy is not supported yet"):
        driver.restart(replace(gw, mode="external"))
    secret = tmp_path / "key"
    secret.write_text("sk-file-secret\n")
    secret.chmod(0o600)  # a secret file readable by others is refused
    assert resolve_secret(f"file:{secret}") == "sk-file-secret"
    assert resolve_secret("cmd:echo sk-cmd-secret") == "sk-cmd-secret"
    with pytest.raises(DriverError, match=r"^master key: environment variable HL_NOT_SET_ANYWHERE is not set$"):
        resolve_secret("env:HL_NOT_SET_ANYWHERE")
    with pytest.raises(DriverError) as err:
        resolve_secret("cmd:echo sk-leaked; exit 3")
    assert "sk-leaked" not in str(err.value) and "exit 3" in str(err.value)
