"""`gateway.mode: container` end to end (issue 6): the real LiteLLM proxy in a container homelab manages.

A private dockerd runs a llama.cpp container and the proxy's container (an image
assembled from the LiteLLM venv of $HOMELAB_LITELLM and its CPython: nothing is
pulled), both on 127.0.0.1 with host networking. Everything goes through the
`homelab reconcile` command, as a user runs it: the config goes into the
gateway's volume, the container is (re-)created with the master key in its
environment, and `/health/liveliness` is waited for after the backends are healthy.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest

from controller.core.state import GATEWAY_CONTAINER, GATEWAY_VOLUME, LABEL_CLUSTER, LABEL_ROLE
from controller.drivers.docker import DockerEngine
from controller.effects.apply import EVENTS_FILE
from specs.model import Node
from tests.integration.test_gateway_real import SYNTH_NOT_TEXT
from tests.support import dockerd as dockerd_support
from tests.support.ports import free_port, free_port_range
from tests.support.wiring import Wired

KEY_ENV = "HOMELAB_TEST_GW_KEY"

SPEC = """\
cluster: {{name: {cluster}}}
secrets: {{litellm: "env:{key_env}"}}
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
models:
  - name: alpha
    runtime: llamacpp
    source: {{gguf: {models}/alpha.gguf}}
    context: 512
    categories: [chat]
    priority: 90
{beta}gateway:
  node: box
  mode: container
  image: "{litellm_image}"
  host: 127.0.0.1
  port: {gateway_port}
  master_key: secret:litellm
routing:
  categories:
    chat: {{models: [alpha]}}
{code}"""

BETA = """\
  - name: beta
    runtime: llamacpp
    source: {{gguf: {models}/beta.gguf}}
    context: 512
    categories: [code]
    priority: 50
"""


class World:
    def __init__(self, fields: dict[str, object], tmp: Path, client: docker.DockerClient) -> None:
        self.fields = fields
        self.tmp = tmp
        self.client = client
        self.key = str(fields["key"])
        self.outputs: list[str] = []
        self.wired = Wired()

    def write_spec(self, *, with_beta: bool) -> None:
        beta = BETA.format(**self.fields) if with_beta else ""
        code = "    code: {models: [beta], fallback: chat}\n" if with_beta else ""
        (self.tmp / "cluster.yaml").write_text(SPEC.format(**self.fields, beta=beta, code=code))

    def connect(self, node: Node) -> DockerEngine:
        return DockerEngine(node, str(self.fields["cluster"]), poll_interval=0.05)

    def reconcile(self, *args: str) -> tuple[int, str]:
        r = self.wired.invoke(["reconcile", *args])
        text = r.stdout + r.stderr
        self.outputs.append(text)
        return r.exit_code, text

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.fields['gateway_port']}{path}"

    def ask(self, model: str) -> httpx.Response:
        return httpx.post(
            self.url("/v1/chat/completions"),
            headers={"Authorization": f"Bearer {self.key}"},
            json={
                "model": model,
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 4,
                "logit_bias": {str(t): -100 for t in range(SYNTH_NOT_TEXT)},
            },
            timeout=60,
            trust_env=False,
        )

    def models(self) -> list[str]:
        r = httpx.get(self.url("/v1/models"), headers={"Authorization": f"Bearer {self.key}"}, trust_env=False)
        assert r.status_code == 200, r.text
        return sorted(m["id"] for m in r.json()["data"])

    def gateway(self) -> docker.models.containers.Container:
        return self.client.containers.get(GATEWAY_CONTAINER)

    def volume_file(self, name: str) -> str:
        engine = self.connect(Node.model_validate(_node(self.fields)))
        try:
            return engine.read_volume_files(GATEWAY_VOLUME, [name])[name] or ""
        finally:
            engine.close()


def _node(fields: dict[str, object]) -> dict[str, object]:
    return {
        "name": "box",
        "tier": "remote",
        "address": "127.0.0.1",
        "ram": "16GiB",
        "docker": {"endpoint": fields["endpoint"], "gpu_access": "none"},
        "llamacpp": {"image": fields["image"], "ports": "20000-20001", "helper_image": fields["helper"]},
    }


@pytest.fixture
def world(
    dockerd: dockerd_support.Dockerd,
    docker_client: docker.DockerClient,
    busybox_image: str,
    llamacpp_image: str,
    litellm_image: str,
    small_gguf: Path,
    cluster: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    wired: Wired,
) -> Iterator[World]:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(small_gguf, models / "alpha.gguf")
    shutil.copy(small_gguf, models / "beta.gguf")
    key = "sk-homelab-" + secrets.token_hex(16)  # not a well-known key: LiteLLM refuses those
    monkeypatch.setenv(KEY_ENV, key)
    base = free_port_range(4)
    fields: dict[str, object] = {
        "cluster": cluster,
        "key_env": KEY_ENV,
        "endpoint": dockerd.url,
        "image": llamacpp_image,
        "helper": busybox_image,
        "litellm_image": litellm_image,
        "base": base,
        "top": base + 3,
        "models": models,
        "gateway_port": free_port(),
        "key": key,
    }
    w = World(fields, tmp_path, docker_client)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    w.wired = wired
    wired.set(connect=lambda spec: w.connect, gateway=None)  # gateway None: the real one, engine.gateways
    try:
        yield w
    finally:
        for container in docker_client.containers.list(all=True):
            container.remove(force=True)
        for volume in docker_client.volumes.list():
            volume.remove(force=True)


def test_container_gateway_is_created_restarted_on_change_and_converges(world: World) -> None:
    base = int(world.fields["base"])  # type: ignore[call-overload]
    world.write_spec(with_beta=False)

    # 1. From nothing: the llama.cpp container healthy first, then the config, the proxy, its liveliness.
    code, out = world.reconcile("--yes")
    assert code == 0, out
    steps = [line.split(" ...")[0] for line in out.splitlines() if line.endswith(" ...")]
    assert steps[-3:] == [
        f"gateway: gateway-write box:{GATEWAY_VOLUME}/config.yaml",
        f"gateway: gateway-restart box:{GATEWAY_VOLUME}/config.yaml",
        f"gateway: gateway-wait box:{GATEWAY_VOLUME}/config.yaml",
    ]
    assert steps.index("box: wait-healthy homelab-alpha") < steps.index(steps[-3])
    gw = world.gateway()
    assert gw.status == "running"
    assert gw.labels[LABEL_CLUSTER] == world.fields["cluster"] and gw.labels[LABEL_ROLE] == "gateway"
    assert world.client.volumes.get(GATEWAY_VOLUME).attrs["Labels"][LABEL_ROLE] == "gateway"
    config = world.volume_file("config.yaml")
    assert f"master_key: os.environ/{KEY_ENV}\n" in config and world.key not in config

    # 2. Through the proxy in its container, `expert/chat` is answered by the llama.cpp backend.
    r = world.ask("expert/chat")
    assert r.status_code == 200, r.text
    assert r.headers["x-litellm-model-api-base"] == f"http://127.0.0.1:{base}/v1"
    assert "beta" not in world.models()

    # 3. Converged: a second reconcile plans nothing (the gateway container is not a stray model container).
    code, out = world.reconcile("--dry-run")
    assert code == 0 and "No changes. The cluster matches the spec." in out, out

    # 4. A second model and category: the plan shows the config diff; the proxy is re-created with it.
    world.write_spec(with_beta=True)
    code, out = world.reconcile("--dry-run", "--out", "plan.json")
    assert code == 2, out
    assert f"~ gateway box:{GATEWAY_VOLUME}/config.yaml  (config changed: write it, restart the proxy)" in out
    assert "        +  - model_name: beta\n" in out  # the config diff, under the change
    old_id = world.gateway().id
    code, out = world.reconcile("--yes")
    assert code == 0, out
    assert world.gateway().id != old_id and world.gateway().status == "running"
    assert {"beta", "expert/code"} <= set(world.models())
    if "auto_router/" in world.volume_file("config.yaml"):  # its classifier plugin, next to it in the volume
        assert "auto" in world.models(), world.gateway().logs().decode(errors="replace")[-3000:]
    r = world.ask("beta")
    assert r.status_code == 200, r.text
    assert r.headers["x-litellm-model-api-base"] == f"http://127.0.0.1:{base + 1}/v1"
    assert "beta" not in world.volume_file("config.yaml.bak")  # the previous config, kept

    code, out = world.reconcile("--dry-run")
    assert code == 0 and "No changes. The cluster matches the spec." in out, out

    # 5. A stopped gateway container is planned as a restart, and healed.
    world.gateway().stop(timeout=5)
    code, out = world.reconcile("--dry-run")
    assert code == 2 and "the proxy does not answer /health/liveliness: restart it" in out, out
    code, out = world.reconcile("--yes")
    assert code == 0, out
    assert world.ask("expert/chat").status_code == 200

    # 6. The key is in the container's environment (how LiteLLM reads it), nowhere else.
    attrs = world.gateway().attrs
    assert f"{KEY_ENV}={world.key}" in attrs["Config"]["Env"]
    shown = json.dumps([attrs["Config"]["Cmd"], attrs["Args"], attrs["Path"], attrs["Config"]["Labels"]])
    assert "--config" in shown and world.key not in shown
    assert world.key not in (world.tmp / "plan.json").read_text()
    assert world.key not in (world.tmp / "state" / EVENTS_FILE).read_text()
    assert all(world.key not in text for text in world.outputs)

    # 7. The gateway leaves the spec: its container goes (first), its volume and config stay.
    text = (world.tmp / "cluster.yaml").read_text()
    start, end = text.index("gateway:\n"), text.index("routing:\n")
    (world.tmp / "cluster.yaml").write_text(text[:start] + text[end:])
    code, out = world.reconcile("--dry-run")
    assert code == 2 and f"- service {GATEWAY_CONTAINER}  (the gateway no longer runs on this node)" in out, out
    code, out = world.reconcile("--yes")
    assert code == 0, out
    assert GATEWAY_CONTAINER not in {c.name for c in world.client.containers.list(all=True)}
    assert "model_name: beta" in world.volume_file("config.yaml")
    code, out = world.reconcile("--dry-run")
    assert code == 0 and "No changes. The cluster matches the spec." in out, out
