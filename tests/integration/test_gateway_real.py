"""End to end (issue 6): a llama.cpp model and an Ollama model behind the real LiteLLM proxy.

Everything is real but Ollama: a private dockerd runs the llama.cpp container,
the Ollama stand-in (tests/support/ollama_standin.py) serves its API and
forwards generation to a real llama-server process, and homelab starts the
real LiteLLM proxy (mode `process`) from $HOMELAB_LITELLM. All on 127.0.0.1.

The spec routes `expert/chat` to the llama.cpp model first and to the Ollama
model next; LiteLLM names the backend that answered in `x-litellm-model-api-base`.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docker
import httpx
import pytest

from controller.drivers.docker import DockerEngine
from controller.drivers.litellm import LocalGateway
from controller.effects.apply import Executor
from controller.effects.engine import CachingConnect, CachingOllama, Prepared, local_gateway
from solver.place import SolveParams
from specs import parse_spec
from specs.model import ClusterSpec
from tests.support import dockerd as dockerd_support
from tests.support.llama_server import _stop, find_binary
from tests.support.ollama_standin import OllamaStandin
from tests.support.ports import free_port, free_port_range
from tests.support.wiring import prepare

SPEC = """\
cluster: {{name: {cluster}}}
secrets: {{litellm: "env:HOMELAB_TEST_LITELLM_KEY"}}
nodes:
  - name: box
    tier: remote
    address: 127.0.0.1
    docker: {{endpoint: "{endpoint}", gpu_access: none}}
    gpus: [{{index: 0, name: declared 8 GiB card, vram: 8GiB}}]
    ram: 16GiB
    llamacpp:
      image: "{image}"
      helper_image: "{helper}"
      ports: {base}-{top}
      bind_address: 127.0.0.1
      threads: 1
      volume: hl-models
      health_timeout: 60s
  - name: desk
    tier: local
    address: 127.0.0.1
    gpus: [{{index: 0, name: declared 8 GiB card, vram: 8GiB}}]
    ram: 16GiB
    ollama: {{url: "{ollama}"}}
models:
  - name: alpha
    runtime: llamacpp
    source: {{gguf: {models}/alpha.gguf}}
    context: 512
    categories: [chat]
    priority: 90
    placement: {{node: box}}
  - name: tiny-chat
    runtime: ollama
    source: {{ollama: "tiny:1b"}}
    context: 512
    categories: [chat]
    placement: {{node: desk}}
    memory: {{vram: 64MiB, layers: 4}}
gateway:
  mode: process
  host: 127.0.0.1
  port: {gateway_port}
  command: ["{litellm}"]
  config_path: {tmp}/litellm/config.yaml
  master_key: secret:litellm
routing:
  categories:
    chat: {{models: [alpha, tiny-chat]}}
"""


SYNTH_NOT_TEXT = 261
"""tests/support/synth.py's vocabulary starts with 5 control tokens and 256 byte tokens. A random model
samples them, and llama-server answers 500 ("does not match the expected format") to output that is not
text: every request keeps them out with a logit bias, so the test sees backends, not sampling luck."""
BAN = [[t, False] for t in range(SYNTH_NOT_TEXT)]


class World:
    def __init__(self, fields: dict[str, object], tmp: Path, client: docker.DockerClient, standin: OllamaStandin):
        self.fields = fields
        self.tmp = tmp
        self.client = client
        self.standin = standin
        self.state = tmp / "state"

    def spec(self) -> ClusterSpec:
        return parse_spec(SPEC.format(**self.fields), "cluster.yaml").spec

    def prepare(self, spec: ClusterSpec) -> tuple[Prepared, CachingConnect, CachingOllama]:
        connect = CachingConnect(lambda node: DockerEngine(node, str(self.fields["cluster"]), poll_interval=0.05))
        ollama = CachingOllama()
        prepared = prepare(
            spec, connect, SolveParams(time_limit=5, workers=1), ollama=ollama, gateway=local_gateway(self.state)
        )
        return prepared, connect, ollama

    def apply(self, spec: ClusterSpec) -> Prepared:
        prepared, connect, ollama = self.prepare(spec)
        assert prepared.desired.gateway is not None
        ex = Executor(
            spec.cluster.name,
            dict(connect.opened),
            self.state,
            health_timeout={"box": 60},
            ollama=dict(ollama.opened),
            gateway=LocalGateway(prepared.desired.gateway, self.state),
            gateway_timeout=90,
        )
        result = ex.apply(prepared.plan)
        assert result.ok, result.summary()
        return prepared

    def ask(self, model: str = "expert/chat") -> httpx.Response:
        return httpx.post(
            f"http://127.0.0.1:{self.fields['gateway_port']}/v1/chat/completions",
            headers={"Authorization": f"Bearer {self.fields['key']}"},
            json={
                "model": model,
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 4,
                "logit_bias": {str(t): -100 for t in range(SYNTH_NOT_TEXT)},
            },
            timeout=60,
            trust_env=False,
        )


@pytest.fixture
def llama_backend(small_gguf: Path, tmp_path: Path) -> Iterator[str]:
    """A real llama-server process: what the Ollama stand-in forwards generation to."""
    port = free_port()
    log = (tmp_path / "llama.log").open("wb")
    proc = subprocess.Popen(
        [find_binary(), "-m", str(small_gguf), "-c", "512", "-t", "1", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (tmp_path / "llama.log").read_text()
            time.sleep(0.1)
        yield url
    finally:
        _stop(proc)
        log.close()


@pytest.fixture
def world(
    dockerd: dockerd_support.Dockerd,
    docker_client: docker.DockerClient,
    busybox_image: str,
    llamacpp_image: str,
    small_gguf: Path,
    litellm_bin: str,
    llama_backend: str,
    cluster: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[World]:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(small_gguf, models / "alpha.gguf")
    key = "sk-homelab-" + secrets.token_hex(12)  # not a well-known key: LiteLLM refuses those
    monkeypatch.setenv("HOMELAB_TEST_LITELLM_KEY", key)
    base = free_port_range(4)
    with OllamaStandin({"tiny:1b": small_gguf}, llama_url=llama_backend, llama_options={"logit_bias": BAN}) as standin:
        fields: dict[str, object] = {
            "cluster": cluster,
            "endpoint": dockerd.url,
            "image": llamacpp_image,
            "helper": busybox_image,
            "base": base,
            "top": base + 3,
            "models": models,
            "ollama": standin.url,
            "gateway_port": free_port(),
            "litellm": litellm_bin,
            "tmp": tmp_path,
            "key": key,
        }
        w = World(fields, tmp_path, docker_client, standin)
        try:
            yield w
        finally:
            gw = w.prepare(w.spec())[0].desired.gateway
            if gw is not None:
                LocalGateway(gw, w.state).stop(gw)
            for container in docker_client.containers.list(all=True):
                container.remove(force=True)
            for volume in docker_client.volumes.list():
                volume.remove(force=True)


def test_requests_reach_the_preferred_backend_then_the_fallback(world: World) -> None:
    spec = world.spec()
    base = int(world.fields["base"])  # type: ignore[call-overload]

    # 1. From nothing: the container, the Ollama pull and derived model, then the proxy, last.
    first = world.apply(spec)
    assert [(s.node, s.kind.value) for s in first.plan.steps] == [
        ("box", "create-volume"),
        ("box", "copy-file"),
        ("box", "run-container"),
        ("box", "wait-healthy"),
        ("desk", "ollama-pull"),
        ("desk", "ollama-create"),
        ("", "gateway-write"),
        ("", "gateway-restart"),
        ("", "gateway-wait"),
    ]
    config = (world.tmp / "litellm" / "config.yaml").read_text()
    assert f"api_base: http://127.0.0.1:{base}/v1\n" in config
    assert f"model: ollama_chat/homelab/tiny-chat\n      api_base: {world.standin.url}\n" in config
    assert "master_key: os.environ/HOMELAB_TEST_LITELLM_KEY\n" in config
    assert str(world.fields["key"]) not in config
    show = httpx.post(f"{world.standin.url}/api/show", json={"model": "homelab/tiny-chat"}, trust_env=False).json()
    assert show["details"]["parent_model"] == "tiny:1b"
    assert "num_ctx" in show["parameters"] and "num_gpu" in show["parameters"]

    # 2. Converged: nothing for the containers, Ollama or the gateway.
    again, _, _ = world.prepare(spec)
    assert again.plan.in_sync, again.plan.changes

    # 3. Through the real proxy, `expert/chat` is answered by the preferred backend: llama.cpp.
    r = world.ask()
    assert r.status_code == 200, r.text
    assert r.headers["x-litellm-model-api-base"] == f"http://127.0.0.1:{base}/v1"
    assert r.json()["choices"][0]["message"]["content"] is not None
    assert world.ask().headers["x-litellm-model-api-base"] == f"http://127.0.0.1:{base}/v1"
    assert httpx.post(
        f"http://127.0.0.1:{world.fields['gateway_port']}/v1/chat/completions", json={}, trust_env=False
    ).status_code in (400, 401)  # no key, no answer

    # 4. The preferred backend stops: the same request is answered through the fallback (Ollama).
    world.client.containers.get("homelab-alpha").kill()
    r = world.ask()
    assert r.status_code == 200, r.text
    assert r.headers["x-litellm-model-api-base"] == world.standin.url
    assert ("POST", "/api/chat") in world.standin.requests

    # 5. The next reconcile restarts the container and leaves Ollama and the gateway alone.
    healed = world.apply(spec)
    assert [(c.action.value, c.kind, c.name) for c in healed.plan.changes] == [("update", "container", "homelab-alpha")]
    assert world.ask().headers["x-litellm-model-api-base"] == f"http://127.0.0.1:{base}/v1"


def test_an_on_demand_ollama_model_is_not_preloaded_and_stays_its_ttl(world: World) -> None:
    """Issue 17: an on-demand Ollama model is created but not loaded; the gateway sends `keep_alive` from its
    `ttl` with each request, so Ollama keeps it that long after the last (the stand-in's /api/ps says until
    when, as Ollama's does)."""
    text = SPEC.format(**world.fields).replace(
        "    placement: {node: desk}\n", "    placement: {node: desk}\n    residency: on-demand\n    ttl: 90s\n"
    )
    spec = parse_spec(text, "cluster.yaml").spec
    prepared = world.apply(spec)
    assert [p.key for p in prepared.placement.pools] == ["desk-gpu0"]
    assert ("desk", "ollama-create") in [(s.node, s.kind.value) for s in prepared.plan.steps]
    assert not [s for s in prepared.plan.steps if s.kind.value == "ollama-preload"]
    ps = httpx.get(f"{world.standin.url}/api/ps", trust_env=False).json()["models"]
    assert ps == []  # created, not loaded
    config = (world.tmp / "litellm" / "config.yaml").read_text()
    assert "      keep_alive: 90s\n" in config
    r = world.ask("tiny-chat")
    assert r.status_code == 200, r.text
    (loaded,) = httpx.get(f"{world.standin.url}/api/ps", trust_env=False).json()["models"]
    left = datetime.fromisoformat(loaded["expires_at"]) - datetime.now(UTC)
    assert timedelta(seconds=60) < left <= timedelta(seconds=90), left  # not Ollama's default 5 minutes
    assert world.prepare(spec)[0].plan.in_sync  # used, loaded, and still nothing to do
