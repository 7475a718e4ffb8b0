"""The gateway's classifier plugin: the same classifier as `homelab route`, standard library only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from controller.core.classifier import LiteLLMClassifier, plugin_source
from controller.core.routing import Classifier, routing_config
from specs.enums import Category
from specs.model import ClassifierRule, Routing, RoutingExample

DATA = Path(__file__).resolve().parent.parent / "data" / "routing.jsonl"

LOAD = """
import asyncio, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("homelab_router", sys.argv[1])  # as LiteLLM's get_instance_fn
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
class Context:
    def __init__(self, messages): self.raw_messages = messages
bodies = json.loads(sys.stdin.read())
print(json.dumps([asyncio.run(module.classifier.classify(Context(b["messages"]))) for b in bodies]))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("specs", "controller", "pydantic"))))
"""


def test_plugin_runs_without_homelab_and_agrees_with_route(tmp_path: Path) -> None:
    routing = Routing(rules={Category.CODE: ClassifierRule(keywords=["homelab reconcile"])})
    tiers = {"code": "code", "chat": "chat", "fast": "chat", "reason": "chat", "vision": "chat", "embed": "chat"}
    config = {"routing": routing_config(routing), "tiers": tiers, "fallback_tier": "chat"}
    plugin = tmp_path / "homelab_router.py"
    plugin.write_text(plugin_source(config))
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:200]]
    texts = [r["request"] for r in rows if isinstance(r["request"], str)] + ["what does homelab reconcile do"]
    bodies = [{"messages": [{"role": "user", "content": t}]} for t in texts]
    # -I -S: no site-packages, no homelab on the path: what the plugin imports is the standard library
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LOAD, str(plugin)],
        input=json.dumps(bodies),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    got, imported = (json.loads(line) for line in done.stdout.splitlines())
    assert imported == []
    ours = Classifier.from_spec(routing)
    want = [tiers[ours.classify(b).category.value] for b in bodies]
    assert got == want
    assert got[-1] == "code"
    assert LiteLLMClassifier(config).tier_for({"messages": []}) == "chat"  # unclassifiable: the fallback tier


def test_one_served_category_still_gives_litellm_two_tiers() -> None:
    """LiteLLM drops a complexity router with fewer than 2 tiers (seen with the real 1.108.7 proxy)."""
    from controller.core.gateway_config import ONLY_TIER_TWIN, auto_router
    from specs import parse_spec
    from specs.enums import Category

    spec = parse_spec(
        """
cluster: {name: t}
nodes:
  - {name: a, tier: local, address: 127.0.0.1, ram: 8GiB, ollama: {url: "http://127.0.0.1:9"}}
models:
  - {name: m, runtime: ollama, source: {ollama: "m:1"}, categories: [chat]}
gateway: {mode: external, port: 4000, master_key: "env:LT_KEY"}
""",
        "x.yaml",
    ).spec
    rendered = auto_router(spec, {Category.CHAT: ["m"]})
    assert rendered is not None
    config = rendered[0]["litellm_params"]["complexity_router_config"]
    assert config["tiers"] == {"chat": "expert/chat", ONLY_TIER_TWIN: "expert/chat"}
    assert [t["name"] for t in config["tier_definitions"]] == ["chat", ONLY_TIER_TWIN]


def test_plugin_with_embedding_stage_asks_the_embed_endpoint_stdlib_only(tmp_path: Path) -> None:
    """The plugin's second stage, in a Python with no site-packages, against an OpenAI-compatible endpoint."""
    from controller.core.routing import all_examples
    from tests.controller.test_routing_embedding import UNSURE, _server

    routing = Routing(examples=[RoutingExample(text=UNSURE, category=Category.REASON)])
    tiers = {"code": "code", "chat": "chat", "fast": "fast", "reason": "reason", "vision": "chat", "embed": "chat"}
    examples = [[e.text, e.category, e.source] for e in all_examples(routing)]
    assert examples[-1] == [UNSURE, "reason", "spec"]
    examples = [examples[-1], ["prime segfault hello", "code", "built-in"]]  # the toy embedding knows few words
    with _server(delay=0.0) as url:
        config = {
            "routing": {**routing_config(routing), "embedding_budget": 5.0},
            "tiers": tiers,
            "fallback_tier": "chat",
            "embedding": {"url": url, "model": "e", "examples": examples},
        }
        plugin = tmp_path / "homelab_router.py"
        plugin.write_text(plugin_source(config))
        script = LOAD.replace(
            "bodies = json.loads",
            "assert module.classifier.two.stage.prepare(30) == '', module.classifier.two.stage.last_error\n"
            "bodies = json.loads",
        )
        bodies = [
            {"messages": [{"role": "user", "content": UNSURE}]},
            {"messages": [{"role": "user", "content": "hi"}]},
        ]
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", script, str(plugin)],
            input=json.dumps(bodies),
            capture_output=True,
            text=True,
            cwd=tmp_path,
            check=True,
        )
    got, imported = (json.loads(line) for line in done.stdout.splitlines())
    assert imported == []
    # the toy embedding puts the spec example (reason) nearest; the rules alone say chat
    assert Classifier.from_spec(routing).classify(UNSURE).category is Category.CHAT
    assert got[0] == "reason"
