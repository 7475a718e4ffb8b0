"""Swap pools at runtime (issue 17): the router container, its preset, the plan around it, the gateway, health
and status — with the real solver and the shipped fake Docker driver."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from ruamel.yaml import YAML

from controller.commands.reconcile import placement_summary
from controller.core.desired import RenderError, args_to_ini, ollama_requirements, render
from controller.core.diff import Action
from controller.core.gateway_config import render_config
from controller.core.state import PRESET_PATH, ContainerConfig, pool_container_name
from controller.drivers.docker import pool_children
from controller.drivers.fake import FakeDockerNode
from controller.drivers.llamacpp import parse_router_models
from controller.effects.apply import Executor
from controller.effects.engine import CachingConnect, Prepared
from controller.effects.health import Endpoint, Probe, Status, Verdict, _pool_member, endpoints, tier_verdict
from controller.effects.pools import observe_pools, pool_now
from solver.place import SolveParams, place
from solver.profiles import profiles_for
from specs import parse_spec
from specs.model import ClusterSpec, Node
from tests.support.wiring import prepare

SPEC = """\
cluster: {name: pools-unit}
nodes:
  - name: box
    tier: remote
    address: 127.0.0.1
    docker: {endpoint: "unix:///tmp/none.sock"}
    gpus: [{index: 0, name: RTX 3090, vram: 24GiB}]
    ram: 64GiB
    llamacpp: {image: "llama:test", ports: 3000-3009, volume: models, threads: 2}
models:
  - name: chat
    runtime: llamacpp
    source: {gguf: /srv/models/chat.gguf}
    placement: {node: box}
    memory: {vram: 10GiB, layers: 32}
  - name: od-a
    runtime: llamacpp
    source: {gguf: /srv/models/a.gguf}
    residency: on-demand
    ttl: 5m
    context: 2048
    memory: {vram: 6GiB, layers: 20}
  - name: od-b
    runtime: llamacpp
    source: {gguf: /srv/models/b.gguf}
    residency: on-demand
    alias: bee
    context: 4096
    args: ["--no-mmap", "-b", "256"]
    memory: {vram: 7GiB, layers: 20}
  - name: od-c
    runtime: llamacpp
    source: {gguf: /srv/models/c.gguf}
    residency: on-demand
    memory: {vram: 8GiB, layers: 20}
gateway: {mode: external, url: "http://127.0.0.1:4000", config_path: /tmp/never-written.yaml, master_key: "env:K"}
"""

SOURCES = {f"/srv/models/{n}.gguf": 1000 + i for i, n in enumerate(("chat", "a", "b", "c"))}
POOL = pool_container_name("box-gpu0")


def spec_of(text: str = SPEC) -> ClusterSpec:
    return parse_spec(text, "cluster.yaml").spec


class Lab:
    def __init__(self) -> None:
        self.box = FakeDockerNode("box", images={"llama:test"}, source_files=dict(SOURCES))

    def connect(self, node: Node) -> FakeDockerNode:
        return self.box

    def prepare(self, spec: ClusterSpec) -> Prepared:
        return prepare(spec, CachingConnect(self.connect), SolveParams(time_limit=5, workers=1))

    def apply(self, spec: ClusterSpec, tmp: Path) -> Prepared:
        prepared = self.prepare(spec)
        result = Executor(spec.cluster.name, {"box": self.box}, tmp, health_check=lambda *a: None).apply(prepared.plan)
        assert result.ok, result.summary()
        return prepared


def pool_config(lab: Lab) -> ContainerConfig:
    config = lab.box.containers[POOL].config
    assert config is not None
    return config


def test_one_router_container_per_pool_with_a_preset_per_member(tmp_path: Path) -> None:
    lab = Lab()
    prepared = lab.apply(spec_of(), tmp_path)
    assert [p.key for p in prepared.placement.pools] == ["box-gpu0"]
    assert sorted(lab.box.containers) == ["homelab-chat", POOL]
    config = pool_config(lab)
    assert [m.model for m in config.members] == ["od-a", "od-b", "od-c"]
    assert config.gpus == (0,) and config.restart_policy == "no"  # layers on a GPU: homelab starts it
    port = str(config.port)
    assert list(config.command) == [
        "--models-preset", PRESET_PATH, "--models-max", "1", "--host", "0.0.0.0", "--port", port,
    ]  # fmt: skip
    sections = config.preset.split("\n\n")
    assert sections[0].endswith("[*]\nthreads = 2")
    assert sections[1].splitlines() == [
        "[od-a]",
        "model = /models/a.gguf",
        "ctx-size = 2048",
        "n-gpu-layers = 21",  # 20 blocks and the output layer
        "cache-type-k = f16",
        "cache-type-v = f16",
        "flash-attn = on",
        "sleep-idle-seconds = 300",  # ttl 5m
    ]
    # served under its alias; the model's own args become preset keys; no ttl: 10 minutes
    assert sections[2].splitlines()[0] == "[bee]"
    assert sections[2].splitlines()[-3:] == ["sleep-idle-seconds = 600", "no-mmap = true", "b = 256"]
    # the members' files are in the volume like any model's
    assert sorted(lab.box.volumes["models"]) == ["a.gguf", "b.gguf", "c.gguf", "chat.gguf"]
    # a second reconcile plans nothing
    assert lab.prepare(spec_of()).plan.steps == ()


def test_a_members_context_replaces_only_its_pools_container(tmp_path: Path) -> None:
    lab = Lab()
    lab.apply(spec_of(), tmp_path)
    before = pool_config(lab).port
    changed = spec_of(SPEC.replace("context: 4096", "context: 8192"))
    changes = [c for c in lab.prepare(changed).diff.changes if c.kind == "container"]
    assert [(c.action, c.name) for c in changes] == [(Action.REPLACE, POOL)]
    assert changes[0].reason == "config changed: members.od-b.context 4096 → 8192"
    lab.apply(changed, tmp_path)
    assert "ctx-size = 8192" in pool_config(lab).preset and pool_config(lab).port == before
    assert lab.prepare(changed).plan.steps == ()


def test_a_member_removed_from_the_spec_leaves_the_pool(tmp_path: Path) -> None:
    lab = Lab()
    lab.apply(spec_of(), tmp_path)
    start = SPEC.index("  - name: od-c")
    without_c = SPEC[:start] + SPEC[SPEC.index("gateway:") :]
    prepared = lab.prepare(spec_of(without_c))
    container = [c for c in prepared.diff.changes if c.kind == "container"]
    assert [(c.action, c.name) for c in container] == [(Action.REPLACE, POOL)]
    assert "members.od-c removed" in container[0].reason
    files = [(c.action, c.name) for c in prepared.diff.changes if c.kind == "file"]
    assert files == [(Action.DELETE, "models/c.gguf")]
    lab.apply(spec_of(without_c), tmp_path)
    assert [m.model for m in pool_config(lab).members] == ["od-a", "od-b"]
    assert "[od-c]" not in pool_config(lab).preset


def test_gateway_routes_members_by_alias_on_the_pools_port_with_a_load_allowance(tmp_path: Path) -> None:
    lab = Lab()
    prepared = lab.apply(spec_of(), tmp_path)
    config = YAML(typ="safe").load(render_config(spec_of(), prepared.desired.nodes))
    port = pool_config(lab).port
    own = {e["model_name"]: e["litellm_params"] for e in config["model_list"] if not e["model_name"].startswith("e")}
    assert own["od-b"] == {
        "model": "openai/bee",
        "api_base": f"http://127.0.0.1:{port}/v1",
        "api_key": "not-needed",
        "timeout": 300 + 600,  # health_timeout (how long a load may take) + the answer
        "stream_timeout": 300,
    }
    assert "timeout" not in own["chat"]  # a pinned model is loaded already


def _router(states: dict[str, dict[str, object]]) -> httpx.Response:
    data = {"data": [{"id": k, "object": "model", "status": v} for k, v in states.items()]}
    return httpx.Response(200, json=data)


@pytest.mark.parametrize(
    ("status", "expected", "error"),
    [
        ({"value": "loaded"}, Status.UP, None),
        ({"value": "loading"}, Status.STARTING, "loading the model"),
        ({"value": "unloaded"}, Status.IDLE, "not loaded: loads on request"),
        ({"value": "sleeping"}, Status.IDLE, "asleep after its ttl: loads on request"),
        ({"value": "unloaded", "failed": True, "exit_code": 1}, Status.DOWN, "its last load failed (exit 1)"),
    ],
)
def test_pool_member_health(status: dict[str, object], expected: Status, error: str | None) -> None:
    e = Endpoint("box/llamacpp/od-b", "remote", "llamapool", "http://x/v1/models", 1.0, "box", "od-b", "bee")
    p = _pool_member(e, _router({"bee": status, "other": {"value": "loaded"}}), Status.UP, 0.01)
    assert (p.status, p.error) == (expected, error)


def test_member_missing_from_the_router_is_down() -> None:
    e = Endpoint("box/llamacpp/od-b", "remote", "llamapool", "http://x/v1/models", 1.0, "box", "od-b", "bee")
    assert _pool_member(e, _router({"other": {"value": "loaded"}}), Status.UP, 0.01).status is Status.DOWN
    assert _pool_member(e, httpx.Response(200, json={"x": 1}), Status.UP, 0.01).status is Status.DOWN


def test_idle_members_keep_the_tier_healthy(tmp_path: Path) -> None:
    lab = Lab()
    prepared = lab.apply(spec_of(), tmp_path)
    eps = [e for e in endpoints(spec_of(), prepared.desired) if e.kind in ("llamacpp", "llamapool")]
    port = pool_config(lab).port
    assert [(e.name, e.kind, e.target, e.served) for e in eps] == [
        ("box/llamacpp/chat", "llamacpp", "http://127.0.0.1:3000/health", "chat"),
        ("box/llamacpp/od-a", "llamapool", f"http://127.0.0.1:{port}/v1/models", "od-a"),
        ("box/llamacpp/od-b", "llamapool", f"http://127.0.0.1:{port}/v1/models", "bee"),
        ("box/llamacpp/od-c", "llamapool", f"http://127.0.0.1:{port}/v1/models", "od-c"),
    ]
    idle = [Probe(eps[0], Status.UP), *(Probe(e, Status.IDLE, error="not loaded") for e in eps[1:])]
    assert tier_verdict(idle) is Verdict.HEALTHY
    assert tier_verdict([*idle, Probe(eps[1], Status.DOWN)]) is Verdict.DEGRADED


def test_router_models_parse() -> None:
    got = parse_router_models(
        {"data": [{"id": "a", "status": {"value": "unloaded", "failed": True, "exit_code": 1}}, {"id": "b"}]}
    )
    assert list(got) == ["a"] and got["a"].state == "failed" and got["a"].exit_code == 1


def test_pool_children_from_docker_top() -> None:
    top = {
        "Titles": ["ELAPSED", "COMMAND"],
        "Processes": [
            ["95", "/llama-server --models-preset /homelab-pool.ini --models-max 1 --host 0.0.0.0 --port 3001"],
            ["12", "/bin/llama-server --host 127.0.0.1 --port 41011 --alias bee --ctx-size 4096"],
        ],
    }
    assert pool_children(top) == {"bee": 12.0}
    assert pool_children({"Titles": ["PID"], "Processes": [["1"]]}) == {}


def test_status_of_a_pool(tmp_path: Path) -> None:
    lab = Lab()
    prepared = lab.apply(spec_of(), tmp_path)
    pool = next(c for c in prepared.desired.nodes["box"].containers if c.pool)
    now = pool_now(pool, {"od-a": "unloaded", "bee": "loaded", "od-c": "sleeping"}, {"bee": 30.0}, 1000.0, None)
    assert [(m.model, m.state, m.since) for m in now.members] == [
        ("od-a", "unloaded", None),
        ("od-b", "loaded", 970.0),
        ("od-c", "sleeping", None),
    ]
    assert now.max_loaded == 1 and [m.model for m in now.loaded] == ["od-b"]
    # the router does not answer (nothing listens on the fake's port): states unknown, said why
    lab.box.pool_children[POOL] = {"bee": 5.0}
    observed = lab.prepare(spec_of()).observed
    got = observe_pools(spec_of(), observed, lab.connect, timeout=0.2, clock=lambda: 100.0)
    assert list(got) == [("box", POOL)]
    assert got["box", POOL].error is not None and {m.state for m in got["box", POOL].members} == {"unknown"}


def test_args_to_ini() -> None:
    assert args_to_ini(["--no-mmap", "-b", "256", "--rope-freq-base=10000", "--temp", "-0.5"], "x") == [
        ("no-mmap", "true"),
        ("b", "256"),
        ("rope-freq-base", "10000"),
        ("temp", "-0.5"),
    ]
    with pytest.raises(RenderError, match="'stray' is not an option"):
        args_to_ini(["stray"], "model 'm': args")


OLLAMA_SPEC = """\
cluster: {name: pools-unit}
nodes:
  - name: nas
    tier: cpu
    address: 127.0.0.1
    ram: 64GiB
    ollama: {url: "http://127.0.0.1:11434", max_loaded: 2}
models:
  - {name: big, runtime: ollama, source: {ollama: "big:1b"}, memory: {vram: 2GiB, layers: 20}}
  - {name: od1, runtime: ollama, source: {ollama: "od1:1b"}, residency: on-demand, ttl: 90s,
     memory: {vram: 2GiB, layers: 20}}
  - {name: od2, runtime: ollama, source: {ollama: "od2:1b"}, residency: on-demand, memory: {vram: 2GiB, layers: 20}}
  - {name: od3, runtime: ollama, source: {ollama: "od3:1b"}, residency: on-demand, memory: {vram: 2GiB, layers: 20}}
"""


def test_ollama_on_demand_models_keep_alive_and_max_loaded() -> None:
    spec = spec_of(OLLAMA_SPEC)
    placement = place(spec, profiles_for(spec), params=SolveParams(time_limit=5, workers=1))
    assert {a.model for a in placement.assignments if a.on_demand} == {"od1", "od2", "od3"}
    state = render(spec, placement)
    ollama = state.nodes["nas"].ollama
    assert ollama is not None
    by = {m.model: m for m in ollama.models}
    assert (by["od1"].preload, by["od1"].keep_alive) == (False, 90.0)
    assert ollama_requirements(spec, placement) == [
        "node nas: Ollama must run with OLLAMA_MAX_LOADED_MODELS=3 (1 pinned + 2 loaded at once from 3 on-demand"
        " models in 1 pool(s)); Ollama's API does not say what it is set to"
    ]

    # OLLAMA_MAX_LOADED_MODELS is server-wide: split into two pools (a GPU's and the CPU's), the node still loads
    # at most max_loaded = 2 on-demand models at once, not 2 per pool.
    (pool,) = placement.pools
    split = replace(
        placement,
        pools=(
            replace(pool, members=pool.members[:2]),
            replace(pool, gpu=None, members=pool.members[2:]),
        ),
    )
    assert ollama_requirements(spec, split)[0].startswith(
        "node nas: Ollama must run with OLLAMA_MAX_LOADED_MODELS=3 (1 pinned + 2 loaded at once from 3 on-demand"
        " models in 2 pool(s))"
    )
    # ... and never counts more on-demand models than it has.
    one = replace(placement, pools=(replace(pool, members=pool.members[:1]),))
    assert "=2 (1 pinned + 1 loaded at once from 1 on-demand" in ollama_requirements(spec, one)[0]


def test_the_plan_shows_the_pool_as_one_share_of_its_gpu() -> None:
    lines = placement_summary(Lab().prepare(spec_of()))
    pool = "swap pool 8.0 GiB [od-a, od-b, od-c] max 1 loaded"  # the largest member's 8 GiB: max_loaded 1
    assert lines[1] == f"  box GPU 0: 18.0 of 24.0 GiB (75%): chat 33/33, {pool}"
