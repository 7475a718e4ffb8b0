"""The LiteLLM proxy config, rendered from the spec and the desired state of the nodes. Pure.

Conventions (docs: the homelab-cluster skill, and what LiteLLM 1.108.7 does):

- a llama.cpp replica is `openai/<alias>` with `api_base: http://<node>:<port>/v1`
  and a placeholder `api_key` (llama-server checks none, LiteLLM wants one);
- an Ollama model is `ollama_chat/homelab/<model>` (`ollama/…` for embedding-only
  models) with the node's Ollama URL as `api_base`: the derived model that
  carries the placement's `num_gpu` and `num_ctx`;
- an on-demand model (a swap pool member: `openai/<alias>` at the pool's router;
  an Ollama model with `keep_alive` from its `ttl`) gets `timeout`/`stream_timeout`
  that allow for loading it first (`on_demand_timeouts`);
- every placed model is a model group under its own name (its replicas are
  deployments of it); every routing category with a placed model is a group
  `expert/<category>` listing its models in preference order (`order: 1, 2 …`,
  LiteLLM sends to the lowest order that is up);
- `router_settings.fallbacks`: a category falls back to its next-best models,
  then to its fallback category (and that one's next-best, and so on);
- the model `gateway.auto_model` (default `auto`) routes by content, with the
  classifier of `homelab route`: it is LiteLLM's complexity router with a custom
  classifier plugin (`controller.core.classifier.LiteLLMClassifier`), one tier per
  category with a group, `tiers: {code: expert/code, ...}`; a category without a
  group goes to its fallback category's tier. The plugin is written next to the
  config as `homelab_router.py` (`GatewayState.files`) and the config names its
  digest, so a new plugin is a new config;
- the master key is `os.environ/NAME`, never the key: NAME is the variable of an
  `env:` reference, else `HOMELAB_LITELLM_MASTER_KEY`, which homelab sets from the
  `file:` or `cmd:` reference in the environment of a proxy it starts.

Only models the placement put somewhere appear. When `routing.categories` is
empty, each category's models are those that list it, highest priority first.
"""

from __future__ import annotations

import difflib
import hashlib
import io
from collections.abc import Mapping
from typing import Any

from ruamel.yaml import YAML

from controller.core.classifier import PLUGIN_MODULE, PLUGIN_OBJECT, plugin_source
from controller.core.power_plugin import POWER_FILE, POWER_MODULE, POWER_OBJECT, power_plugin_source
from controller.core.routing import GROUP_PREFIX, all_examples, category_models, fallback_chain, routing_config
from controller.core.state import (
    GATEWAY_CONFIG,
    GATEWAY_MOUNT,
    GATEWAY_VOLUME,
    GatewayState,
    NodeState,
    container_run_hash,
    url_host,
)
from specs.enums import Category
from specs.errors import HomelabError
from specs.model import ClusterSpec, LlamaCppRuntime

API_KEY_PLACEHOLDER = "not-needed"
DEFAULT_KEY_ENV = "HOMELAB_LITELLM_MASTER_KEY"


class GatewayError(HomelabError, ValueError):
    """The gateway section cannot be rendered (one line, for the user)."""


def master_key_ref(spec: ClusterSpec) -> tuple[str, str]:
    """(the env variable the config names, the provider reference the key is resolved from)."""
    assert spec.gateway is not None
    ref = spec.gateway.master_key
    if ref.startswith("secret:"):
        name = ref[7:]
        if name not in spec.secrets:
            raise GatewayError(f"gateway.master_key: unknown secret '{name}'")
        ref = spec.secrets[name]
    if ref.startswith("env:"):
        return ref[4:], ref
    return DEFAULT_KEY_ENV, ref


def gateway_url(spec: ClusterSpec) -> str:
    assert spec.gateway is not None
    gw = spec.gateway
    if gw.url:
        return gw.url.rstrip("/")
    host = spec.node(gw.node).address if gw.node is not None else gw.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{url_host(host)}:{gw.port}"


ON_DEMAND_ANSWER_S = 600
"""What an on-demand deployment's timeout allows for the answer itself, beyond loading the model."""


def on_demand_timeouts(spec: ClusterSpec, node_name: str) -> dict[str, int]:
    """An on-demand model's first request waits for its load: LiteLLM's `stream_timeout` (to the first chunk)
    is the node's load allowance (`llamacpp.health_timeout`, what a starting container may take to be
    healthy; Ollama nodes get the same default), and `timeout` that plus ON_DEMAND_ANSWER_S."""
    rt = spec.node(node_name).llamacpp
    load = rt.health_timeout if rt is not None else LlamaCppRuntime.model_fields["health_timeout"].default
    return {"timeout": round(load) + ON_DEMAND_ANSWER_S, "stream_timeout": round(load)}


def _deployments(spec: ClusterSpec, nodes: Mapping[str, NodeState]) -> dict[str, list[dict[str, Any]]]:
    """model name → litellm_params of each placed replica, in node order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(nodes):
        node = spec.node(name) if any(n.name == name for n in spec.nodes) else None
        state = nodes[name]
        if node is None:
            continue
        for c in state.containers:
            if c.config is None:
                continue
            api_base = f"http://{url_host(node.address)}:{c.config.port}/v1"
            if not c.pool:
                out.setdefault(c.model, []).append(
                    {"model": f"openai/{c.config.alias}", "api_base": api_base, "api_key": API_KEY_PLACEHOLDER}
                )
                continue
            for member in c.config.members:  # a swap pool: each member by its alias on the pool's router
                out.setdefault(member.model, []).append(
                    {
                        "model": f"openai/{member.alias}",
                        "api_base": api_base,
                        "api_key": API_KEY_PLACEHOLDER,
                        **on_demand_timeouts(spec, name),
                    }
                )
        if state.ollama is not None:
            for m in state.ollama.models:
                model = spec.model(m.model)
                embed_only = model.categories == [Category.EMBED]
                short = m.name.removesuffix(":latest")
                params: dict[str, Any] = {
                    "model": f"{'ollama' if embed_only else 'ollama_chat'}/{short}",
                    "api_base": state.ollama.url.rstrip("/"),
                }
                if model.on_demand:
                    # Ollama unloads a model `keep_alive` after the request that names it
                    params["keep_alive"] = f"{round(model.idle_ttl)}s"
                    params.update(on_demand_timeouts(spec, name))
                out.setdefault(m.model, []).append(params)
    return out


def placed_groups(spec: ClusterSpec, placed: set[str]) -> dict[Category, list[str]]:
    """Each category's placed models, best first (`routing.category_models` less what is not placed)."""
    cats = list(spec.routing.categories) if spec.routing.categories else list(Category)
    return {cat: [m for m in category_models(spec, cat) if m in placed] for cat in cats}


def group_fallbacks(spec: ClusterSpec, cat: Category, groups: Mapping[Category, list[str]]) -> list[str]:
    """Where a request for `expert/<cat>` goes when its best model fails, in order.

    Its next-best models (their own groups), then its fallback category's group and that
    category's next-best models, and so on down the fallback chain (`routing.fallback_chain`);
    a model already tried is not tried again.
    """
    models = groups.get(cat, [])
    chain: list[str] = list(models[1:])
    covered = set(models)
    for nxt in fallback_chain(spec, cat)[1:]:
        others = groups.get(nxt, [])
        if others and others[0] not in covered:
            chain.append(GROUP_PREFIX + nxt.value)
        chain.extend(m for m in others[1:] if m not in covered)
        covered.update(others)
    return chain


PLUGIN_FILE = PLUGIN_MODULE + ".py"
TIER_DESCRIPTIONS = {
    Category.CODE: "programming: code, errors, tools, configuration files",
    Category.REASON: "maths, logic, proofs and step-by-step reasoning",
    Category.CHAT: "conversation, writing and general questions",
    Category.VISION: "requests with images",
    Category.FAST: "greetings and short questions",
    Category.EMBED: "embeddings",
}


ONLY_TIER_TWIN = "same"
"""The second tier name when one category alone has models."""


def embedding_endpoint(
    spec: ClusterSpec, groups: Mapping[Category, list[str]], deployments: Mapping[str, list[dict[str, Any]]]
) -> dict[str, str] | None:
    """Where the plugin's embedding stage asks for embeddings: the first replica of `routing.embedding_model`,
    else of the embed category's best model, as an OpenAI-compatible base URL and model name."""
    if not spec.routing.embedding:
        return None
    name = spec.routing.embedding_model or next(iter(groups.get(Category.EMBED, [])), None)
    replicas = deployments.get(name or "", [])
    if not replicas:
        return None
    params = replicas[0]
    provider, _, model = str(params["model"]).partition("/")
    base = str(params["api_base"]).rstrip("/")
    if provider != "openai":  # Ollama: its OpenAI-compatible API is under /v1
        base += "/v1"
    return {"url": base, "model": model}


def auto_router(
    spec: ClusterSpec, groups: Mapping[Category, list[str]], embedder: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], str] | None:
    """The `auto` model's config entry and the text of its classifier plugin; None when no category has a model."""
    assert spec.gateway is not None
    placed = [cat for cat in Category if groups.get(cat)]
    if not placed:
        return None
    tier_of: dict[str, str] = {}
    for cat in Category:
        served = next((c for c in fallback_chain(spec, cat) if groups.get(c)), None)
        if served is not None:
            tier_of[cat.value] = served.value
    default = spec.routing.default_category
    fallback = tier_of.get(default.value, placed[0].value)
    config: dict[str, Any] = {"routing": routing_config(spec.routing), "tiers": tier_of, "fallback_tier": fallback}
    if embedder is not None:
        # the examples travel inside the plugin: LiteLLM's environment has no homelab package data
        examples = [[e.text, e.category, e.source] for e in all_examples(spec.routing)]
        config["embedding"] = {**embedder, "examples": examples}
    plugin = plugin_source(config)
    definitions = [{"name": c.value, "description": TIER_DESCRIPTIONS[c]} for c in placed]
    tiers = {c.value: GROUP_PREFIX + c.value for c in placed}
    if len(placed) == 1:
        # LiteLLM refuses a complexity router with fewer than 2 tiers (and then drops `auto`):
        # with one category served, a second tier names the same group; the classifier never picks it.
        definitions.append({"name": ONLY_TIER_TWIN, "description": "the same models (LiteLLM wants two tiers)"})
        tiers[ONLY_TIER_TWIN] = GROUP_PREFIX + placed[0].value
    entry = {
        "model_name": spec.gateway.auto_model,
        "litellm_params": {
            "model": "auto_router/complexity_router",
            "complexity_router_config": {
                "classifier_type": "custom",
                "classifier_plugin": f"{PLUGIN_MODULE}.{PLUGIN_OBJECT}",
                "tier_definitions": definitions,
                "fallback_tier": fallback,
                "tiers": tiers,
            },
        },
    }
    return entry, plugin


def _secret_provider(spec: ClusterSpec, ref: str) -> str:
    """The provider reference (env:, file:, cmd:) of a `secret:NAME` reference: what the plugin resolves."""
    return spec.secrets.get(ref[7:], ref) if ref.startswith("secret:") else ref


def power_config(
    spec: ClusterSpec,
    nodes: Mapping[str, NodeState],
    groups: Mapping[Category, list[str]],
    deployments: Mapping[str, list[dict[str, Any]]],
) -> dict[str, Any] | None:
    """The wake-on-request plugin's config (`controller.core.power_plugin`); None when no placed model is on a
    node with `power`."""
    sleepers: dict[str, Any] = {}
    for node in spec.nodes:
        if node.power is None or node.wake is None:
            continue
        wake: dict[str, Any]
        if node.wake.wol is not None:
            w = node.wake.wol
            wake = {"wol": {"mac": w.mac, "broadcast": w.broadcast, "port": w.port}}
        else:
            stdin = _secret_provider(spec, node.wake.stdin) if node.wake.stdin is not None else None
            wake = {"command": node.wake.command, "stdin": stdin}
        sleepers[node.name] = {
            "wake": wake,
            "wake_timeout": node.power.wake_timeout,
            "on_request": node.power.on_request,
        }
    models: dict[str, list[list[str]]] = {}
    for name in sorted(nodes):
        state = nodes[name]
        for c in state.containers:
            if c.config is not None:
                models.setdefault(c.model, []).append([name, c.health_url])
        if state.ollama is not None:
            for om in state.ollama.models:
                models.setdefault(om.model, []).append([name, state.ollama.url.rstrip("/") + "/api/tags"])
    if not any(node in sleepers for replicas in models.values() for node, _ in replicas):
        return None
    first: dict[str, list[str]] = {m: [m] for m in deployments}
    fallbacks: dict[str, list[str]] = {}
    for cat, members in groups.items():
        if not members:
            continue
        group = GROUP_PREFIX + cat.value
        first[group] = [members[0]]
        chain = group_fallbacks(spec, cat, groups)
        fallbacks[group] = chain
        for m in members:
            fallbacks.setdefault(m, [x for x in [*members, *chain] if x != m])
    return {"nodes": sleepers, "models": models, "first": first, "fallbacks": fallbacks}


def _render(spec: ClusterSpec, nodes: Mapping[str, NodeState]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The config YAML and the files next to it."""
    assert spec.gateway is not None
    deployments = _deployments(spec, nodes)
    groups = placed_groups(spec, set(deployments))
    model_list: list[dict[str, Any]] = []
    for name in sorted(deployments):
        for params in deployments[name]:
            model_list.append({"model_name": name, "litellm_params": dict(params)})
    fallbacks: list[dict[str, list[str]]] = []
    for cat in Category:
        models = groups.get(cat, [])
        if not models:
            continue
        group = GROUP_PREFIX + cat.value
        for order, name in enumerate(models, start=1):
            for params in deployments[name]:
                model_list.append({"model_name": group, "litellm_params": {**params, "order": order}})
        chain = group_fallbacks(spec, cat, groups)
        if chain:
            fallbacks.append({group: chain})
    files: tuple[tuple[str, str], ...] = ()
    header = ""
    auto = auto_router(spec, groups, embedding_endpoint(spec, groups, deployments))
    if auto is not None:
        entry, plugin = auto
        model_list.append(entry)
        files = ((PLUGIN_FILE, plugin),)
        digest = hashlib.sha256(plugin.encode()).hexdigest()[:16]
        header = f"# Model '{spec.gateway.auto_model}' is classified by {PLUGIN_FILE} next to it (sha256 {digest}).\n"
    power = power_config(spec, nodes, groups, deployments)
    if power is not None:
        plugin = power_plugin_source(power)
        files = (*files, (POWER_FILE, plugin))
        digest = hashlib.sha256(plugin.encode()).hexdigest()[:16]
        header += f"# Requests for models on nodes that sleep wake them through {POWER_FILE} (sha256 {digest}).\n"
    key_env, _ = master_key_ref(spec)
    config: dict[str, Any] = {"model_list": model_list}
    if fallbacks:
        config["router_settings"] = {"fallbacks": fallbacks}
    # A request that falls back from one provider to another must not fail on a parameter one lacks.
    config["litellm_settings"] = {"drop_params": True}
    if power is not None:
        config["litellm_settings"]["callbacks"] = [f"{POWER_MODULE}.{POWER_OBJECT}"]
    config["general_settings"] = {"master_key": f"os.environ/{key_env}"}
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    buf = io.StringIO()
    buf.write(
        f"# LiteLLM proxy config for cluster '{spec.cluster.name}', written by homelab from the spec.\n"
        "# Edits here are replaced on the next `homelab reconcile`.\n" + header
    )
    yaml.dump(config, buf)
    return buf.getvalue(), files


def render_config(spec: ClusterSpec, nodes: Mapping[str, NodeState]) -> str:
    """The LiteLLM config YAML (stable: same spec and state, same bytes)."""
    return _render(spec, nodes)[0]


def render_gateway(spec: ClusterSpec, nodes: Mapping[str, NodeState]) -> GatewayState | None:
    """The desired gateway: its config text and how it runs; None when the spec has no gateway."""
    gw = spec.gateway
    if gw is None:
        return None
    key_env, key_ref = master_key_ref(spec)
    command: tuple[str, ...] = ()
    path = gw.config_path
    run_hash = ""
    if gw.mode == "process":
        command = (*gw.command, "--config", gw.config_path, "--host", gw.host, "--port", str(gw.port))
    elif gw.mode == "container":
        # The config (and the files next to it) live in a Docker volume on the gateway's node.
        command = ("--config", f"{GATEWAY_MOUNT}/{GATEWAY_CONFIG}", "--host", gw.host, "--port", str(gw.port))
        path = f"{gw.node}:{GATEWAY_VOLUME}/{GATEWAY_CONFIG}"
        run_hash = container_run_hash(gw.image or "", command, key_env)
    text, files = _render(spec, nodes)
    return GatewayState(
        mode=gw.mode,
        path=path,
        text=text,
        files=files,
        url=gateway_url(spec),
        command=command,
        key_env=key_env,
        key_ref=key_ref,
        node=gw.node if gw.mode == "container" else None,
        image=(gw.image or "") if gw.mode == "container" else "",
        run_hash=run_hash,
    )


def config_diff(old: str | None, new: str | None, path: str) -> str:
    """A unified diff of two config texts (`--- PATH (now)` / `+++ PATH (planned)`)."""
    lines = difflib.unified_diff(
        (old or "").splitlines(keepends=True),
        (new or "").splitlines(keepends=True),
        fromfile=f"{path} (now)" if old is not None else "/dev/null",
        tofile=f"{path} (planned)",
        n=2,
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)
