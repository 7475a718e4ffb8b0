"""The Ollama driver against the Ollama stand-in (tests/support/ollama_standin.py), and the stand-in's API shapes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

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
