"""Issue 7 against real components on 127.0.0.1: the gateway's `auto` model, `homelab health`, `homelab route`.

- the real LiteLLM proxy (mode `process`, $HOMELAB_LITELLM) in front of two Ollama stand-ins
  (one model each, generation forwarded to a real llama-server): a code question sent as
  `model: auto` is answered by the code model's backend, over `/v1/chat/completions` and
  `/v1/completions`, and `homelab health` reports the proxy's `/health/liveliness`;
- two real llama-server processes (`-t 1`, a small synthetic GGUF) on the ports the spec gives
  two code models: `homelab route` picks the first, then, with it stopped, the next, and says why.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.drivers.litellm import LocalGateway
from controller.effects.apply import Executor
from controller.effects.engine import CachingConnect, CachingOllama, local_gateway
from solver.place import SolveParams
from specs import parse_spec
from specs.model import ClusterSpec
from tests.integration.test_gateway_real import BAN, SYNTH_NOT_TEXT
from tests.support.llama_server import _stop, find_binary
from tests.support.ollama_standin import OllamaStandin
from tests.support.ports import free_port
from tests.support.wiring import prepare

GATEWAY_SPEC = """\
cluster: {{name: {cluster}}}
secrets: {{litellm: "env:HOMELAB_TEST_LITELLM_KEY"}}
nodes:
  - {{name: desk, tier: local, address: 127.0.0.1, ram: 16GiB, ollama: {{url: "{code_url}"}},
     gpus: [{{index: 0, name: declared card, vram: 8GiB}}]}}
  - {{name: den, tier: remote, address: 127.0.0.1, ram: 16GiB, ollama: {{url: "{chat_url}"}},
     gpus: [{{index: 0, name: declared card, vram: 8GiB}}]}}
models:
  - {{name: coder, runtime: ollama, source: {{ollama: "coder:1b"}}, context: 512, categories: [code],
     placement: {{node: desk}}, memory: {{vram: 64MiB, layers: 4}}}}
  - {{name: talker, runtime: ollama, source: {{ollama: "talker:1b"}}, context: 512, categories: [chat],
     placement: {{node: den}}, memory: {{vram: 64MiB, layers: 4}}}}
gateway:
  mode: process
  host: 127.0.0.1
  port: {gateway_port}
  command: ["{litellm}"]
  config_path: {tmp}/litellm/config.yaml
  master_key: secret:litellm
health: {{timeout: 3s}}
routing:
  categories:
    code: {{models: [coder], fallback: chat}}
    chat: {{models: [talker]}}
"""

CODE_QUESTION = "Why does my Python function raise a KeyError when the dict has the key? def f(d): return d['k']"


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer 200 within {timeout}s")


def _llama_server(gguf: Path, port: int, log_path: Path, alias: str | None = None) -> subprocess.Popen[bytes]:
    """A llama-server on 127.0.0.1:PORT; `alias`: the model it stands for (`--alias`, as homelab renders it, and
    what health checks on `/v1/models` to know the server is that model's)."""
    extra = ["--alias", alias] if alias else []
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                find_binary(),
                "-m",
                str(gguf),
                "-c",
                "512",
                "-t",
                "1",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc


@pytest.fixture
def llama_url(small_gguf: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = tmp_path / "llama.log"
    proc = _llama_server(small_gguf, port, log)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def _cli(args: list[str]) -> tuple[int, str]:
    r = CliRunner().invoke(app, args)
    return r.exit_code, r.stdout


def test_auto_goes_to_the_code_model_and_health_reports_the_proxy(
    small_gguf: Path, litellm_bin: str, llama_url: str, cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-homelab-" + secrets.token_hex(12)
    monkeypatch.setenv("HOMELAB_TEST_LITELLM_KEY", key)
    state = tmp_path / "state"
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(state))
    options = {"logit_bias": BAN}
    with (
        OllamaStandin({"coder:1b": small_gguf}, llama_url=llama_url, llama_options=options) as code,
        OllamaStandin({"talker:1b": small_gguf}, llama_url=llama_url, llama_options=options) as chat,
    ):
        port = free_port()
        text = GATEWAY_SPEC.format(
            cluster=cluster, code_url=code.url, chat_url=chat.url, gateway_port=port, litellm=litellm_bin, tmp=tmp_path
        )
        spec_file = tmp_path / "cluster.yaml"
        spec_file.write_text(text)
        spec: ClusterSpec = parse_spec(text, "cluster.yaml").spec
        connect = CachingConnect(lambda node: pytest.fail(f"no Docker here ({node.name})"))
        ollama = CachingOllama()
        prepared = prepare(
            spec, connect, SolveParams(time_limit=5, workers=1), ollama=ollama, gateway=local_gateway(state)
        )
        gw = prepared.desired.gateway
        assert gw is not None
        try:
            ex = Executor(
                spec.cluster.name,
                {},
                state,
                ollama=dict(ollama.opened),
                gateway=LocalGateway(gw, state),
                gateway_timeout=90,
            )
            result = ex.apply(prepared.plan)
            assert result.ok, result.summary()
            config_dir = tmp_path / "litellm"
            assert (config_dir / "homelab_router.py").read_text() == dict(gw.files)["homelab_router.py"]
            assert "classifier_plugin: homelab_router.classifier" in (config_dir / "config.yaml").read_text()

            base = f"http://127.0.0.1:{port}"
            auth = {"Authorization": f"Bearer {key}"}
            models = httpx.get(f"{base}/v1/models", headers=auth, trust_env=False).json()
            assert "auto" in {m["id"] for m in models["data"]}

            # `homelab route` says code; the proxy agrees, over both APIs
            rc, out = _cli(["route", "-f", str(spec_file), "--json", "--no-health", CODE_QUESTION])
            assert rc == 0 and json.loads(out)["gateway_model"] == "expert/code", out
            bias = {str(t): -100 for t in range(SYNTH_NOT_TEXT)}
            asks: list[tuple[str, dict[str, Any], str]] = [
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": CODE_QUESTION}]}, code.url),
                ("/v1/completions", {"prompt": CODE_QUESTION}, code.url),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me a story about a cat"}]},
                 chat.url),
            ]  # fmt: skip
            for path, body, backend in asks:
                r = httpx.post(
                    base + path,
                    headers=auth,
                    json={"model": "auto", "max_tokens": 4, "logit_bias": bias, **body},
                    timeout=60,
                    trust_env=False,
                )
                assert r.status_code == 200, (path, r.text)
                assert r.headers["x-litellm-model-api-base"] == backend, (path, body)

            # `homelab health` reports the proxy's liveliness
            rc, out = _cli(["health", "-f", str(spec_file), "--json"])
            report = json.loads(out)
            (proxy,) = report["tiers"]["gateway"]["endpoints"]
            assert (proxy["target"], proxy["status"], proxy["code"]) == (f"{base}/health/liveliness", "up", 200)
            assert rc == 0, out
        finally:
            LocalGateway(gw, state).stop(gw)

        # an unreachable proxy is reported, and costs health nothing
        start = time.monotonic()
        rc, out = _cli(["health", "-f", str(spec_file), "--json"])
        elapsed = time.monotonic() - start
        report = json.loads(out)
        (proxy,) = report["tiers"]["gateway"]["endpoints"]
        assert (proxy["status"], proxy["error"]) == ("down", "Connection refused")
        assert report["tiers"]["local"]["verdict"] == "HEALTHY" and rc == 1, out
        assert elapsed < 3.0 + 5.0  # the probe timeout, plus placement and rendering


ROUTE_SPEC = """\
cluster: {{name: {cluster}}}
nodes:
  - name: box
    tier: local
    address: 127.0.0.1
    docker: {{endpoint: "unix://{tmp}/no-docker.sock", gpu_access: none}}
    gpus: [{{index: 0, name: declared card, vram: 8GiB}}]
    ram: 16GiB
    llamacpp: {{image: "llama:none", ports: {low}-{high}, bind_address: 127.0.0.1}}
models:
  - {{name: coder-a, runtime: llamacpp, source: {{gguf: {tmp}/a.gguf}}, context: 512, categories: [code],
     port: {port_a}, placement: {{node: box}}}}
  - {{name: coder-b, runtime: llamacpp, source: {{gguf: {tmp}/b.gguf}}, context: 512, categories: [code],
     port: {port_b}, placement: {{node: box}}}}
health: {{timeout: 3s, interval: 30s}}
routing:
  categories:
    code: {{models: [coder-a, coder-b]}}
"""


def test_route_probes_real_llama_servers_and_falls_back(
    small_gguf: Path, cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port_a, port_b = free_port(), free_port()
    for name in ("a", "b"):
        shutil.copy(small_gguf, tmp_path / f"{name}.gguf")
    low, high = min(port_a, port_b), max(port_a, port_b)
    spec_file = tmp_path / "cluster.yaml"
    spec_file.write_text(
        ROUTE_SPEC.format(cluster=cluster, tmp=tmp_path, low=low, high=high, port_a=port_a, port_b=port_b)
    )
    procs = {
        port: _llama_server(small_gguf, port, tmp_path / f"{port}.log", alias)
        for port, alias in ((port_a, "coder-a"), (port_b, "coder-b"))
    }
    try:
        for port, proc in procs.items():
            _wait_http(f"http://127.0.0.1:{port}/health", proc, tmp_path / f"{port}.log")
        monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state-1"))
        rc, out = _cli(["route", "-f", str(spec_file), "--json", CODE_QUESTION])
        assert rc == 0, out
        doc = json.loads(out)
        assert (doc["model"], doc["url"], doc["fallback_used"]) == ("coder-a", f"http://127.0.0.1:{port_a}/v1", False)

        _stop(procs[port_a])
        # within health.interval the cached answer stands: coder-a still looks up
        rc, out = _cli(["route", "-f", str(spec_file), "--json", CODE_QUESTION])
        assert json.loads(out)["model"] == "coder-a", out
        # a fresh probe (another state directory: no cache) finds it down and takes the next model
        monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state-2"))
        rc, out = _cli(["route", "-f", str(spec_file), "--json", CODE_QUESTION])
        assert rc == 0, out
        doc = json.loads(out)
        assert (doc["model"], doc["url"], doc["fallback_used"]) == ("coder-b", f"http://127.0.0.1:{port_b}/v1", True)
        assert doc["reason"] == "coder-a is down (on box: Connection refused); using coder-b on box"
    finally:
        for proc in procs.values():
            _stop(proc)
