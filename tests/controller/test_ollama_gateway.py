"""Ollama nodes and the LiteLLM gateway in the reconcile core, with the shipped fakes (issue 6)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from controller.core.diff import Action
from controller.core.gateway_config import group_fallbacks, master_key_ref, placed_groups, render_config
from controller.core.plan import Plan, render_text
from controller.core.state import GatewayState, OllamaModelState
from controller.drivers.fake import FakeDockerNode
from controller.drivers.fake_gateway import FakeGateway
from controller.drivers.fake_ollama import FakeOllamaNode
from controller.effects.apply import Executor
from controller.effects.engine import CachingConnect, Prepared
from solver.gguf import read_header
from solver.place import SolveParams
from specs import parse_spec
from specs.enums import Category
from specs.model import ClusterSpec, Node
from tests.support.synth import shape_by_name, write_synth_gguf
from tests.support.wiring import Wired, prepare

SPEC = """\
cluster: {name: lab}
secrets: {master: env:LAB_LITELLM_KEY}
nodes:
  - name: box
    tier: remote
    address: 127.0.0.1
    docker: {endpoint: "unix:///tmp/none.sock"}
    gpus: [{index: 0, name: RTX 3090, vram: 24GiB}]
    ram: 64GiB
    llamacpp: {image: "llama:test", ports: 3000-3009, volume: models}
  - name: desk
    tier: local
    address: 127.0.0.2
    gpus: [{index: 0, name: RTX 4090, vram: 24GiB}]
    ram: 32GiB
    ollama: {url: "http://127.0.0.2:11434", keep_alive: 30m}
models:
  - name: coder
    runtime: llamacpp
    source: {gguf: /srv/models/coder.gguf}
    categories: [code]
    placement: {node: box}
    memory: {vram: 5GiB, layers: 28}
  - name: chat
    runtime: ollama
    source: {ollama: "qwen2.5:14b"}
    context: 8192
    categories: [chat, code]
    preload: true
    placement: {node: desk}
    memory: {vram: 10GiB, layers: 48}
  - name: fast
    runtime: ollama
    source: {ollama: llama3.2}
    categories: [fast]
    placement: {node: desk}
    memory: {vram: 2GiB, layers: 28}
gateway: {mode: process, port: 4000, config_path: /srv/litellm/config.yaml, master_key: secret:master}
routing:
  categories:
    code: {models: [coder, chat], fallback: chat}
    chat: {models: [chat], fallback: fast}
    fast: {models: [fast]}
"""

GOLDEN = """\
# LiteLLM proxy config for cluster 'lab', written by homelab from the spec.
# Edits here are replaced on the next `homelab reconcile`.
# Model 'auto' is classified by homelab_router.py next to it (sha256 DIGEST).
model_list:
  - model_name: chat
    litellm_params:
      model: ollama_chat/homelab/chat
      api_base: http://127.0.0.2:11434
  - model_name: coder
    litellm_params:
      model: openai/coder
      api_base: http://127.0.0.1:3000/v1
      api_key: not-needed
  - model_name: fast
    litellm_params:
      model: ollama_chat/homelab/fast
      api_base: http://127.0.0.2:11434
  - model_name: expert/code
    litellm_params:
      model: openai/coder
      api_base: http://127.0.0.1:3000/v1
      api_key: not-needed
      order: 1
  - model_name: expert/code
    litellm_params:
      model: ollama_chat/homelab/chat
      api_base: http://127.0.0.2:11434
      order: 2
  - model_name: expert/chat
    litellm_params:
      model: ollama_chat/homelab/chat
      api_base: http://127.0.0.2:11434
      order: 1
  - model_name: expert/fast
    litellm_params:
      model: ollama_chat/homelab/fast
      api_base: http://127.0.0.2:11434
      order: 1
  - model_name: auto
    litellm_params:
      model: auto_router/complexity_router
      complexity_router_config:
        classifier_type: custom
        classifier_plugin: homelab_router.classifier
        tier_definitions:
          - name: code
            description: 'programming: code, errors, tools, configuration files'
          - name: chat
            description: conversation, writing and general questions
          - name: fast
            description: greetings and short questions
        fallback_tier: chat
        tiers:
          code: expert/code
          chat: expert/chat
          fast: expert/fast
router_settings:
  fallbacks:
    - expert/code:
        - chat
        - expert/fast
    - expert/chat:
        - expert/fast
litellm_settings:
  drop_params: true
general_settings:
  master_key: os.environ/LAB_LITELLM_KEY
"""


def masked(config: str) -> str:
    """The config with the plugin's digest as DIGEST: it changes with controller/classifier.py
    (tests/controller/test_gateway_plugin.py checks it)."""
    return re.sub(r"\(sha256 [0-9a-f]{16}\)", "(sha256 DIGEST)", config)


REGISTRY = {"qwen2.5:14b": 9_000_000_000, "llama3.2:latest": 2_000_000_000, "old:7b": 4_000_000_000}


def spec_of(text: str = SPEC) -> ClusterSpec:
    return parse_spec(text, "cluster.yaml").spec


class Lab:
    def __init__(self) -> None:
        self.docker = FakeDockerNode("box", images={"llama:test"}, source_files={"/srv/models/coder.gguf": 5_000})
        self.ollama = FakeOllamaNode("desk", registry=dict(REGISTRY))
        self.gateway = FakeGateway(running=False)
        self.progress: list[tuple[str, str, int, int]] = []

    def prepare(self, spec: ClusterSpec) -> Prepared:
        return prepare(
            spec,
            CachingConnect(lambda node: self.docker),
            SolveParams(time_limit=5, workers=1),
            ollama=self._ollama,
            gateway=lambda desired: self.gateway,
        )

    def _ollama(self, node: Node) -> FakeOllamaNode:
        assert node.name == "desk"
        return self.ollama

    def executor(self, spec: ClusterSpec, tmp: Path) -> Executor:
        return Executor(
            spec.cluster.name,
            {"box": self.docker},
            tmp,
            health_check=lambda url, timeout, cancelled, serves: None,
            on_progress=lambda *a: self.progress.append(a),
            ollama={"desk": self.ollama},
            gateway=self.gateway,
        )

    def apply(self, spec: ClusterSpec, tmp: Path) -> Plan:
        plan = self.prepare(spec).plan
        result = self.executor(spec, tmp).apply(plan)
        assert result.ok, result.summary()
        return plan


def steps(plan: Plan) -> list[tuple[str, str, str]]:
    return [(s.node, s.kind.value, s.name) for s in plan.steps]


# ------------------------------------------------------------------ the renderer


def test_golden_gateway_config() -> None:
    prepared = Lab().prepare(spec_of())
    assert prepared.desired.gateway is not None and prepared.desired.gateway.text is not None
    assert masked(prepared.desired.gateway.text) == GOLDEN
    assert render_config(spec_of(), prepared.desired.nodes) == prepared.desired.gateway.text  # stable


def test_master_key_is_an_environment_reference_never_the_key() -> None:
    assert master_key_ref(spec_of()) == ("LAB_LITELLM_KEY", "env:LAB_LITELLM_KEY")
    by_file = spec_of(SPEC.replace("env:LAB_LITELLM_KEY", "file:/run/secrets/litellm"))
    assert master_key_ref(by_file) == ("HOMELAB_LITELLM_MASTER_KEY", "file:/run/secrets/litellm")
    text = Lab().prepare(by_file).desired.gateway
    assert text is not None and text.text is not None
    assert "master_key: os.environ/HOMELAB_LITELLM_MASTER_KEY" in text.text
    assert "/run/secrets" not in text.text


def test_categories_come_from_the_models_when_routing_is_empty() -> None:
    spec = spec_of(SPEC.split("routing:")[0])
    groups = placed_groups(spec, {"coder", "chat", "fast"})
    assert groups[Category.CODE] == ["chat", "coder"]  # same priority: by name
    assert groups[Category.FAST] == ["fast"]
    assert group_fallbacks(spec, Category.CODE, groups) == ["coder"]


def test_only_placed_models_are_routed() -> None:
    # `fast` cannot fit anywhere: it is neither a model group nor a fallback.
    spec = spec_of(SPEC.replace("memory: {vram: 2GiB, layers: 28}", "memory: {vram: 200GiB}"))
    gw = Lab().prepare(spec).desired.gateway
    assert gw is not None and gw.text is not None
    assert "homelab/fast" not in gw.text and "expert/fast" not in gw.text
    assert "    - expert/code:\n        - chat\n" in gw.text


# ------------------------------------------------------------------ plan and apply


def test_first_reconcile_orders_ollama_and_puts_the_gateway_last(tmp_path: Path) -> None:
    lab = Lab()
    lab.ollama.models["notes:latest"] = None  # pulled by hand: stays
    spec = spec_of()
    plan = lab.prepare(spec).plan
    assert steps(plan) == [
        ("box", "create-volume", "models"),
        ("box", "copy-file", "models/coder.gguf"),
        ("box", "run-container", "homelab-coder"),
        ("box", "wait-healthy", "homelab-coder"),
        ("desk", "ollama-pull", "llama3.2:latest"),
        ("desk", "ollama-pull", "qwen2.5:14b"),
        ("desk", "ollama-create", "homelab/chat:latest"),
        ("desk", "ollama-create", "homelab/fast:latest"),
        ("desk", "ollama-preload", "homelab/chat:latest"),
        ("", "gateway-write", "/srv/litellm/config.yaml"),
        ("", "gateway-restart", "/srv/litellm/config.yaml"),
        ("", "gateway-wait", "/srv/litellm/config.yaml"),
    ]
    chat = next(s.ollama_model for s in plan.steps if s.name == "homelab/chat:latest")
    assert chat is not None and (chat.base, chat.num_gpu, chat.num_ctx) == ("qwen2.5:14b", 49, 8192)
    assert chat.keep_alive == 1800
    text = render_text(plan)
    assert "node desk:\n    + ollama-tag llama3.2:latest  (not pulled on this node)\n" in text
    assert "    + ollama-model homelab/chat:latest  (from qwen2.5:14b: num_gpu 49, num_ctx 8192)\n" in text
    assert "gateway:\n    + gateway /srv/litellm/config.yaml  (config file does not exist: write it, restart" in text
    assert "        +++ /srv/litellm/config.yaml (planned)\n" in text
    assert "        +  master_key: os.environ/LAB_LITELLM_KEY\n" in text
    assert text.endswith("Plan: 8 to add, 0 to change, 0 to destroy.\n")

    lab.executor(spec, tmp_path).apply(plan)
    assert lab.ollama.calls[-5:] == [
        ("pull", "llama3.2:latest"),
        ("pull", "qwen2.5:14b"),
        ("create", "homelab/chat:latest"),
        ("create", "homelab/fast:latest"),
        ("preload", "homelab/chat:latest"),
    ]
    assert ("desk", "pulling qwen2.5:14b", 9_000_000_000, 9_000_000_000) in lab.progress
    assert lab.gateway.calls == ["write_config", "restart", "wait_live"]
    assert lab.gateway.text is not None and masked(lab.gateway.text) == GOLDEN
    assert "notes:latest" in lab.ollama.models

    # A second reconcile plans nothing for Ollama or the gateway.
    again = lab.prepare(spec).plan
    assert again.in_sync and again.steps == () and again.changes == (), render_text(again)


def test_changes_to_context_and_preload_are_planned(tmp_path: Path) -> None:
    lab = Lab()
    lab.apply(spec_of(), tmp_path)
    lab.ollama.loaded_now.clear()  # the keep-alive ran out
    plan = lab.prepare(spec_of(SPEC.replace("context: 8192", "context: 16384"))).plan
    assert [(c.action, c.kind, c.name, c.reason) for c in plan.changes] == [
        (Action.REPLACE, "ollama-model", "homelab/chat:latest", "parameters changed: num_ctx 8192 → 16384"),
    ]
    assert steps(plan) == [
        ("desk", "ollama-create", "homelab/chat:latest"),
        ("desk", "ollama-preload", "homelab/chat:latest"),
    ]
    lab.executor(spec_of(), tmp_path).apply(plan)
    lab.ollama.loaded_now.clear()
    plan = lab.prepare(spec_of(SPEC.replace("context: 8192", "context: 16384"))).plan
    assert [(c.action, c.reason) for c in plan.changes] == [(Action.UPDATE, "not loaded: preload (keep-alive 1800s)")]
    assert steps(plan) == [("desk", "ollama-preload", "homelab/chat:latest")]


def test_a_model_leaving_the_spec_deletes_its_derived_model_and_reroutes(tmp_path: Path) -> None:
    lab = Lab()
    lab.apply(spec_of(), tmp_path)
    without_fast = SPEC.replace("fallback: fast", "").replace("    fast: {models: [fast]}\n", "")
    without_fast = without_fast.split("  - name: fast")[0] + "gateway:" + without_fast.split("gateway:")[1]
    plan = lab.prepare(spec_of(without_fast)).plan
    assert steps(plan) == [
        ("desk", "ollama-delete", "homelab/fast:latest"),
        ("", "gateway-write", "/srv/litellm/config.yaml"),
        ("", "gateway-restart", "/srv/litellm/config.yaml"),
        ("", "gateway-wait", "/srv/litellm/config.yaml"),
    ]
    gw = next(c for c in plan.changes if c.kind == "gateway")
    assert gw.action is Action.UPDATE and gw.reason == "config changed: write it, restart the proxy"
    assert "-      model: ollama_chat/homelab/fast\n" in gw.detail
    # Without prune the base tag pulled for `fast` stays.
    assert all(c.kind != "ollama-tag" for c in plan.changes)


def test_prune_deletes_other_tags_only_when_the_spec_says_so(tmp_path: Path) -> None:
    lab = Lab()
    lab.ollama.models["notes:latest"] = None
    lab.apply(spec_of(), tmp_path)
    assert lab.prepare(spec_of()).plan.in_sync
    pruning = SPEC.replace("keep_alive: 30m}", "keep_alive: 30m, prune: true}")
    plan = lab.prepare(spec_of(pruning)).plan
    assert [(c.action, c.kind, c.name, c.reason) for c in plan.changes] == [
        (Action.DELETE, "ollama-tag", "notes:latest", "not in spec (ollama.prune: true)")
    ]
    lab.executor(spec_of(pruning), tmp_path).apply(plan)
    assert "notes:latest" not in lab.ollama.models
    assert lab.prepare(spec_of(pruning)).plan.in_sync


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("unknown", "pull qwen2.5:14b: pull model manifest: file does not exist"),
        ("dropped", "pull qwen2.5:14b: connection dropped before Ollama finished (last status: downloading)"),
    ],
)
def test_a_failed_pull_stops_the_plan_and_leaves_nothing_half_made(tmp_path: Path, fault: str, error: str) -> None:
    lab = Lab()
    if fault == "unknown":
        del lab.ollama.registry["qwen2.5:14b"]
    else:
        lab.ollama.drop_pull.add("qwen2.5:14b")
    spec = spec_of()
    result = lab.executor(spec, tmp_path).apply(lab.prepare(spec).plan)
    assert not result.ok
    desk = result.outcomes["desk"]
    assert desk.failed is not None and desk.failed.name == "qwen2.5:14b"
    assert desk.error == error
    assert [s.kind.value for s in desk.not_run] == ["ollama-create", "ollama-create", "ollama-preload"]
    assert set(lab.ollama.models) == {"llama3.2:latest"}  # no derived model, no half-pulled tag
    gateway = result.outcomes["gateway"]
    assert gateway.done == [] and [s.kind.value for s in gateway.not_run] == [
        "gateway-write",
        "gateway-restart",
        "gateway-wait",
    ]
    assert lab.gateway.calls == [] and lab.gateway.text is None
    assert "node desk: FAILED at ollama-pull qwen2.5:14b: " + error in result.summary()


def test_an_unreachable_ollama_is_not_empty() -> None:
    lab = Lab()
    lab.ollama.reachable = False
    plan = lab.prepare(spec_of()).plan
    assert plan.unreachable == {"desk": "Ollama on desk does not answer (ConnectError)"}
    assert all(s.node != "desk" for s in plan.steps)
    assert [(c.kind, c.name) for c in plan.deferred if c.node == "desk"][:2] == [
        ("ollama-tag", "llama3.2:latest"),
        ("ollama-tag", "qwen2.5:14b"),
    ]


def test_a_proxy_that_is_down_is_restarted(tmp_path: Path) -> None:
    lab = Lab()
    lab.apply(spec_of(), tmp_path)
    lab.gateway.running = False
    plan = lab.prepare(spec_of()).plan
    assert [(c.kind, c.reason) for c in plan.changes] == [
        ("gateway", "the proxy does not answer /health/liveliness: restart it")
    ]
    assert [s.kind.value for s in plan.steps] == ["gateway-restart", "gateway-wait"]


def test_plan_with_ollama_and_gateway_round_trips() -> None:
    plan = Lab().prepare(spec_of()).plan
    again = Plan.from_json(json.loads(plan.dumps()))
    assert again == plan
    assert any(isinstance(s.gateway, GatewayState) for s in again.steps)
    assert any(isinstance(s.ollama_model, OllamaModelState) for s in again.steps)


def test_saved_plan_is_stale_when_the_gateway_file_changed() -> None:
    lab = Lab()
    before = lab.prepare(spec_of())
    lab.gateway.text = "# edited by hand\n"
    after = lab.prepare(spec_of())
    assert before.observed.fingerprint() != after.observed.fingerprint()


# ------------------------------------------------------------------ the command line


def test_gateway_render_prints_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab_cli: Lab, wired: Wired
) -> None:
    (tmp_path / "cluster.yaml").write_text(SPEC)
    r = wired.invoke(["gateway", "render", "-f", str(tmp_path / "cluster.yaml")])
    assert r.exit_code == 0, r.output
    assert masked(r.stdout) == GOLDEN


def test_gateway_render_without_a_gateway_is_one_line(tmp_path: Path, lab_cli: Lab, wired: Wired) -> None:
    (tmp_path / "cluster.yaml").write_text(SPEC.split("gateway:")[0])
    r = wired.invoke(["gateway", "render", "-f", str(tmp_path / "cluster.yaml")])
    assert r.exit_code == 1
    assert r.stderr.strip() == "error: the spec has no `gateway` section"


def test_reconcile_command_applies_ollama_and_gateway(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    lab_cli: Lab,
    wired: Wired,
) -> None:
    (tmp_path / "cluster.yaml").write_text(SPEC)
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    wired.set(health_check=lambda url, timeout, cancelled, serves: None)
    r = wired.invoke(["reconcile", "--yes", "-f", str(tmp_path / "cluster.yaml")])
    assert r.exit_code == 0, r.output
    assert "desk: pulling qwen2.5:14b: 4292/8583 MiB (50%)" in r.stdout
    assert ": gateway-write /srv/litellm/config.yaml ..." in r.stdout
    assert r.stdout.rstrip().endswith("Apply complete: 12 steps.")
    r = wired.invoke(["reconcile", "--dry-run", "-f", str(tmp_path / "cluster.yaml")])
    assert r.exit_code == 0, r.output
    assert "No changes. The cluster matches the spec." in r.stdout
    # `homelab status` lists the Ollama node's models with their parameters, next to the containers
    r = wired.invoke(["status", "-f", str(tmp_path / "cluster.yaml")])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.startswith("desk: Ollama http://127.0.0.2:11434:"))
    assert header.endswith("2 homelab models, 2 other tags"), header
    assert any(line.strip().startswith("homelab/chat:latest  from qwen2.5:14b  num_gpu ") for line in lines), lines
    r = wired.invoke(["status", "--json", "-f", str(tmp_path / "cluster.yaml")])
    ollama = json.loads(r.stdout)["nodes"]["desk"]["ollama"]
    assert ollama["reachable"] and {m["name"] for m in ollama["models"]} == {
        "homelab/chat:latest",
        "homelab/fast:latest",
    }


@pytest.fixture
def lab_cli(monkeypatch: pytest.MonkeyPatch, wired: Wired) -> Lab:
    lab = Lab()
    wired.set(connect=lambda spec: lambda node: lab.docker)
    wired.set(ollama=lambda node: lab.ollama)
    wired.set(gateway=lambda state: lambda desired: lab.gateway)
    return lab


def test_fake_ollama_keeps_the_contract() -> None:
    fake = FakeOllamaNode("n", registry={"a:1": 10})
    fake.pull("a:1")
    with pytest.raises(Exception, match="not found"):
        fake.create(OllamaModelState("n", "homelab/x:latest", "x", "b:1", 1, 512))
    fake.create(OllamaModelState("n", "homelab/x:latest", "x", "a:1", 1, 512, preload=True))
    assert replace(fake.derived("homelab/x:latest")) == OllamaModelState("n", "homelab/x:latest", "x", "a:1", 1, 512)
    fake.delete("homelab/x:latest")
    fake.delete("homelab/x:latest")  # already gone: not an error
    assert fake.list_models() == ["a:1"]


def test_model_info_of_a_pulled_tag_feeds_the_estimator(tmp_path: Path) -> None:
    header = read_header(write_synth_gguf(tmp_path / "t.gguf", shape_by_name("mha-f16")))
    info = {k: v for k, v in header.metadata.items() if not isinstance(v, (list, tuple))}
    spec = spec_of(SPEC.replace("    memory: {vram: 2GiB, layers: 28}\n", ""))
    # Not pulled anywhere and no `memory:`: not placed, and the reason says so.
    unplaced = Lab().prepare(spec).placement.unplaced
    assert [u.model for u in unplaced] == ["fast"]
    assert "'llama3.2' is pulled on no Ollama node that answered, and no `memory:` is declared" in unplaced[0].reason
    # Pulled (by hand, or by an earlier reconcile): /api/show's model_info sizes it.
    lab = Lab()
    lab.ollama.models["llama3.2:latest"] = None
    lab.ollama.infos["llama3.2:latest"] = {"model_info": info, "details": {"quantization_level": "F16"}}
    prepared = lab.prepare(spec)
    fast = next(a for a in prepared.placement.assignments if a.model == "fast")
    assert (fast.layers, fast.gpu_layers) == (5, 5)  # 4 blocks and the output layer, all on the GPU
    assert ("model_info", "llama3.2:latest") in lab.ollama.calls
