"""A swap pool on a private dockerd behind the real LiteLLM proxy: what `tests/integration/test_pools_real.py`
and `bench/pool_swap.py` both run.

Three on-demand members (one GGUF each) on one declared GPU of node `box` (`gpu_access: none`: the router
container runs on the CPU), `max_loaded: 1`; the LiteLLM proxy in mode `process` on 127.0.0.1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from controller.drivers.docker import DockerEngine
from controller.drivers.litellm import LocalGateway
from controller.effects.apply import Executor
from controller.effects.engine import CachingConnect, Prepared, local_gateway
from solver.place import SolveParams
from specs import parse_spec
from specs.model import ClusterSpec
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
      volume: hl-pool
      health_timeout: 60s
      max_loaded: 1
models:
{members}
gateway:
  mode: process
  host: 127.0.0.1
  port: {gateway_port}
  command: ["{litellm}"]
  config_path: {tmp}/litellm/config.yaml
  master_key: secret:litellm
"""

MEMBER = """\
  - name: {name}
    runtime: llamacpp
    source: {{gguf: {models}/{name}.gguf}}
    context: {context}
    categories: [chat]
    residency: on-demand
    ttl: 10m
"""

MEMBERS = ("od-a", "od-b", "od-c")
SYNTH_NOT_TEXT = 261
"""The synthetic vocabulary's 5 control and 256 byte tokens, kept out of answers (see test_gateway_real.py)."""


class PoolLab:
    def __init__(self, fields: dict[str, object], tmp: Path, members: tuple[str, ...] = MEMBERS) -> None:
        """`fields`: the SPEC's placeholders (cluster, endpoint, image, helper, base, top, models, gateway_port,
        litellm, tmp, key); each member's GGUF is `{models}/{name}.gguf`."""
        self.fields = fields
        self.tmp = tmp
        self.state = tmp / "state"
        self.contexts = dict.fromkeys(members, 512)

    @property
    def router(self) -> str:
        """The pool's router (its one port: the lowest of the node's range)."""
        return f"http://127.0.0.1:{self.fields['base']}"

    def stop_gateway(self) -> None:
        gw = self.prepare(self.spec())[0].desired.gateway
        if gw is not None:
            LocalGateway(gw, self.state).stop(gw)

    def spec_text(self) -> str:
        members = "".join(
            MEMBER.format(name=n, models=self.fields["models"], context=self.contexts[n]) for n in self.contexts
        )
        return SPEC.format(members=members, **self.fields)

    def spec(self) -> ClusterSpec:
        return parse_spec(self.spec_text(), "cluster.yaml").spec

    def prepare(self, spec: ClusterSpec) -> tuple[Prepared, CachingConnect]:
        connect = CachingConnect(lambda node: DockerEngine(node, str(self.fields["cluster"]), poll_interval=0.05))
        prepared = prepare(spec, connect, SolveParams(time_limit=5, workers=1), gateway=local_gateway(self.state))
        return prepared, connect

    def apply(self, spec: ClusterSpec) -> Prepared:
        prepared, connect = self.prepare(spec)
        assert prepared.desired.gateway is not None
        ex = Executor(
            spec.cluster.name,
            dict(connect.opened),
            self.state,
            health_timeout={"box": 60},
            gateway=LocalGateway(prepared.desired.gateway, self.state),
            gateway_timeout=90,
        )
        result = ex.apply(prepared.plan)
        assert result.ok, result.summary()
        return prepared

    def ask(self, model: str, *, direct: bool = False) -> tuple[str, str, float]:
        """(the answer, the model the backend named, seconds from the request to its first token), streamed
        through the gateway (or, `direct`, to the pool's router itself)."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 6,
            "temperature": 0,
            "top_k": 1,
            "seed": 1,
            "stream": True,
            "logit_bias": {str(t): -100 for t in range(SYNTH_NOT_TEXT)},
        }
        url = f"http://127.0.0.1:{self.fields['gateway_port']}/v1/chat/completions"
        headers = {"Authorization": f"Bearer {self.fields['key']}"}
        if direct:
            url, headers = f"{self.router}/v1/chat/completions", {}
        start = time.perf_counter()
        first: float | None = None
        text, backend = "", ""
        with httpx.stream("POST", url, json=body, headers=headers, timeout=120, trust_env=False) as r:
            assert r.status_code == 200, r.read().decode()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                delta = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content") or ""
                if delta and first is None:
                    first = time.perf_counter() - start
                text += delta
                backend = chunk.get("model") or backend
        assert first is not None, f"{model}: no token came back"
        return text, backend, first


def unload_all(router: str) -> None:
    """Unload every loaded member (`POST /models/unload`), and wait until none is loaded."""
    models = httpx.get(f"{router}/v1/models", timeout=10, trust_env=False).json()["data"]
    for m in models:
        if m["status"]["value"] in ("loaded", "loading", "sleeping"):
            httpx.post(f"{router}/models/unload", json={"model": m["id"]}, timeout=30, trust_env=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        models = httpx.get(f"{router}/v1/models", timeout=10, trust_env=False).json()["data"]
        if all(m["status"]["value"] == "unloaded" for m in models):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{router}: members still loaded after 30 s")
