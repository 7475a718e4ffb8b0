"""Cross-reference checks over a structurally valid spec.

Each check yields a `Problem` with the path of the offending value; `specs.load`
turns paths into `file:line:col`. Every problem is found in one pass, so the
user fixes them all at once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import Enum

from pydantic import BaseModel

from specs.enums import Category, Runtime
from specs.errors import Path, Severity
from specs.model import ClusterSpec, Effect, Model, Node, gguf_file_name


@dataclass(frozen=True, slots=True)
class Problem:
    path: Path
    message: str
    severity: Severity = Severity.ERROR
    at_key: bool = False


def check_references(spec: ClusterSpec) -> list[Problem]:
    """Every cross-reference problem in `spec`, errors and warnings."""
    return [
        *_unique_names(spec),
        *_gpus(spec),
        *_models(spec),
        *_source_nodes(spec),
        *_file_names(spec),
        *_ports(spec),
        *_owned_args(spec),
        *_routing(spec),
        *_gateway(spec),
        *_secrets(spec),
        *_health(spec),
        *_power(spec),
    ]


def _names(items: list[str]) -> str:
    return ", ".join(items) if items else "none"


def _unique_names(spec: ClusterSpec) -> Iterator[Problem]:
    sections: tuple[tuple[str, list[str]], ...] = (
        ("nodes", [node.name for node in spec.nodes]),
        ("models", [model.name for model in spec.models]),
    )
    for section, names in sections:
        first: dict[str, int] = {}
        for i, name in enumerate(names):
            if name in first:
                yield Problem(
                    (section, i, "name"),
                    f"duplicate {section[:-1]} name '{name}' (also {section}[{first[name]}])",
                )
            else:
                first[name] = i


def _gpus(spec: ClusterSpec) -> Iterator[Problem]:
    for n, node in enumerate(spec.nodes):
        first: dict[int, int] = {}
        for g, gpu in enumerate(node.gpus):
            if gpu.index in first:
                yield Problem(
                    ("nodes", n, "gpus", g, "index"),
                    f"GPU index {gpu.index} is used twice on node '{node.name}' (also gpus[{first[gpu.index]}])",
                )
            else:
                first[gpu.index] = g


def _pins_allow(model: Model, node: Node) -> bool:
    """The node offers the model's runtime and matches its `placement.node` and `placement.tier` pins."""
    p = model.placement
    return (
        model.runtime in node.runtimes
        and (p.node is None or node.name == p.node)
        and (p.tier is None or node.tier is p.tier)
    )


def _eligible_nodes(spec: ClusterSpec, model: Model) -> list[Node]:
    """Nodes the model could run on, from its runtime and pins alone."""
    p = model.placement
    out = []
    for node in spec.nodes:
        if not _pins_allow(model, node):
            continue
        if (p.min_gpu_layers > 0 or p.gpus or not p.cpu_offload) and not node.gpus and model.memory is None:
            continue
        out.append(node)
    return out


def possible_nodes(spec: ClusterSpec, model: Model) -> list[Node]:
    """Every node the placement may put `model` on: the nodes `solver.problem.node_allows` accepts
    (runtime, pins, a fixed port inside the node's range) and, for a GGUF that lives on one node
    (`source.node`), that node only."""
    out = []
    for node in spec.nodes:
        if not _pins_allow(model, node):
            continue
        if model.runtime is Runtime.LLAMACPP:
            if model.source.node is not None and node.name != model.source.node:
                continue
            if model.port is not None and node.llamacpp is not None and model.port not in node.llamacpp.ports:
                continue
        out.append(node)
    return out


def _first_by_name(nodes: list[Node]) -> dict[str, Node]:
    """Nodes by name; with a duplicate name (reported elsewhere) the first one wins."""
    out: dict[str, Node] = {}
    for node in nodes:
        out.setdefault(node.name, node)
    return out


def _models(spec: ClusterSpec) -> Iterator[Problem]:
    nodes = _first_by_name(spec.nodes)
    for m, model in enumerate(spec.models):
        base = ("models", m)
        p = model.placement
        pinned = nodes.get(p.node) if p.node is not None else None
        if p.node is not None and pinned is None:
            yield Problem((*base, "placement", "node"), f"unknown node '{p.node}' (nodes: {_names(list(nodes))})")
        if model.source.node is not None and model.source.node not in nodes:
            yield Problem(
                (*base, "source", "node"), f"unknown node '{model.source.node}' (nodes: {_names(list(nodes))})"
            )
        if p.tier is not None and not any(node.tier is p.tier for node in spec.nodes):
            yield Problem((*base, "placement", "tier"), f"no node has tier '{p.tier.value}'")
        if pinned is not None:
            if p.tier is not None and pinned.tier is not p.tier:
                yield Problem(
                    (*base, "placement", "tier"),
                    f"node '{pinned.name}' is tier '{pinned.tier.value}', not '{p.tier.value}'",
                )
            if model.runtime not in pinned.runtimes:
                yield Problem(
                    (*base, "placement", "node"),
                    f"node '{pinned.name}' does not offer the {model.runtime.value} runtime",
                )
            indices = {gpu.index for gpu in pinned.gpus}
            for g, index in enumerate(p.gpus or []):
                if index not in indices:
                    yield Problem(
                        (*base, "placement", "gpus", g),
                        f"node '{pinned.name}' has no GPU {index} (GPUs: {_names([str(i) for i in sorted(indices)])})",
                    )
            if (p.min_gpu_layers > 0 or not p.cpu_offload) and not pinned.gpus:
                key = "min_gpu_layers" if p.min_gpu_layers > 0 else "cpu_offload"
                yield Problem(
                    (*base, "placement", key),
                    f"node '{pinned.name}' has no GPUs, so the model cannot have layers on a GPU",
                )
        layers = model.memory.layers if model.memory is not None else None
        if layers is not None and p.min_gpu_layers > layers + 1:
            yield Problem(
                (*base, "placement", "min_gpu_layers"),
                f"is more than the model's {layers} layers + the output layer",
            )
        if not any(model.runtime in node.runtimes for node in spec.nodes):
            yield Problem((*base, "runtime"), f"no node offers the {model.runtime.value} runtime")
            continue
        if (p.node is not None and pinned is None) or (
            p.tier is not None and not any(node.tier is p.tier for node in spec.nodes)
        ):
            continue
        eligible = _eligible_nodes(spec, model)
        if pinned is not None or p.tier is not None:
            if model.replicas > max(len(eligible), 1):
                yield Problem(
                    (*base, "replicas"),
                    f"{model.replicas} replicas need {model.replicas} different nodes;"
                    f" only {len(eligible)} match the model's placement",
                )
        elif model.replicas > len(eligible):
            yield Problem(
                (*base, "replicas"),
                f"{model.replicas} replicas need {model.replicas} different nodes offering"
                f" {model.runtime.value}; there are {len(eligible)}",
            )


def _source_nodes(spec: ClusterSpec) -> Iterator[Problem]:
    """A GGUF on one node (`source.node`) can only be served there: files are not copied between nodes."""
    nodes = _first_by_name(spec.nodes)
    for m, model in enumerate(spec.models):
        where = model.source.node
        if where is None or where not in nodes or model.runtime is not Runtime.LLAMACPP:
            continue
        path = ("models", m, "source", "node")
        node = nodes[where]
        p = model.placement
        if node.llamacpp is None:
            yield Problem(path, f"node '{where}' holds the file but does not offer the llamacpp runtime")
        elif p.node is not None and p.node != where:
            yield Problem(
                ("models", m, "placement", "node"),
                f"the model's file is on node '{where}' (source.node): it can only run there",
            )
        elif p.tier is not None and node.tier is not p.tier:
            yield Problem(
                ("models", m, "placement", "tier"),
                f"the model's file is on node '{where}' (source.node), which is tier '{node.tier.value}'",
            )
        elif model.replicas > 1:
            yield Problem(
                ("models", m, "replicas"),
                f"{model.replicas} replicas need {model.replicas} nodes, but the file is on node '{where}' only",
            )


def _could_share_a_node(spec: ClusterSpec, a: Model, b: Model) -> list[str]:
    names_a = {n.name for n in possible_nodes(spec, a)}
    return [n.name for n in possible_nodes(spec, b) if n.name in names_a]


def _file_names(spec: ClusterSpec) -> Iterator[Problem]:
    """Files are copied into a node's model volume under their base name (controller.core.desired):
    two different paths with one base name cannot both be on a node."""
    seen: list[tuple[int, Model]] = []
    for m, model in enumerate(spec.models):
        if model.runtime is not Runtime.LLAMACPP or model.source.gguf is None:
            continue
        name = gguf_file_name(model.source.gguf)
        for o, other in seen:
            assert other.source.gguf is not None
            if gguf_file_name(other.source.gguf) != name or other.source.gguf == model.source.gguf:
                continue
            shared = _could_share_a_node(spec, model, other)
            if shared:
                yield Problem(
                    ("models", m, "source", "gguf"),
                    f"has the file name '{name}' of models[{o}] ('{other.name}'), a different file;"
                    f" both could be placed on node '{shared[0]}', whose model volume holds one file of a name:"
                    " rename one file or pin the models to different nodes",
                )
                break
        seen.append((m, model))


def _ports(spec: ClusterSpec) -> Iterator[Problem]:
    nodes = _first_by_name(spec.nodes)
    used: dict[tuple[str, int], int] = {}
    for m, model in enumerate(spec.models):
        if model.runtime is not Runtime.LLAMACPP or model.port is None:
            continue
        path = ("models", m, "port")
        pinned = nodes.get(model.placement.node) if model.placement.node is not None else None
        if pinned is None:
            if model.placement.node is None and not any(
                n.llamacpp is not None and model.port in n.llamacpp.ports for n in spec.nodes
            ):
                yield Problem(path, f"port {model.port} is outside every node's llama.cpp port range")
            continue
        if pinned.llamacpp is not None and model.port not in pinned.llamacpp.ports:
            rng = pinned.llamacpp.ports
            yield Problem(
                path, f"port {model.port} is outside node '{pinned.name}' llama.cpp ports {rng.start}-{rng.end}"
            )
        key = (pinned.name, model.port)
        if key in used:
            other = spec.models[used[key]].name
            yield Problem(path, f"port {model.port} on node '{pinned.name}' is also used by model '{other}'")
        else:
            used[key] = m
    gw = spec.gateway
    if gw is not None and gw.node in nodes:
        llamacpp = nodes[gw.node].llamacpp
        if llamacpp is not None and gw.port in llamacpp.ports:
            yield Problem(("gateway", "port"), f"port {gw.port} is inside node '{gw.node}' llama.cpp port range")


def _routing(spec: ClusterSpec) -> Iterator[Problem]:
    models = {model.name: model for model in spec.models}
    routes = spec.routing.categories
    cycles: set[frozenset[Category]] = set()
    for category, route in routes.items():
        base = ("routing", "categories", category.value)
        seen: set[str] = set()
        for i, name in enumerate(route.models):
            if name not in models:
                yield Problem((*base, "models", i), f"unknown model '{name}' (models: {_names(list(models))})")
            elif name in seen:
                yield Problem((*base, "models", i), f"model '{name}' is listed twice")
            elif category not in models[name].categories:
                yield Problem(
                    (*base, "models", i),
                    f"model '{name}' does not list '{category.value}' in its categories",
                    Severity.WARNING,
                )
            seen.add(name)
        if route.fallback is category:
            yield Problem((*base, "fallback"), "a category cannot fall back to itself")
        elif route.fallback is not None:
            chain = [category]
            current: Category | None = route.fallback
            while current is not None and current not in chain:
                chain.append(current)
                nxt = routes.get(current)
                current = nxt.fallback if nxt is not None else None
            if current is not None and current is category and frozenset(chain) not in cycles:
                cycles.add(frozenset(chain))
                cycle = " → ".join(c.value for c in [*chain, category])
                yield Problem((*base, "fallback"), f"fallback cycle: {cycle}")
    for category, rule in spec.routing.rules.items():
        if rule.replace_defaults and not (rule.keywords or rule.patterns or rule.file_extensions):
            yield Problem(
                ("routing", "rules", category.value, "replace_defaults"),
                "replaces the built-in rules with nothing: add keywords, patterns or file_extensions",
            )
    em = spec.routing.embedding_model
    if em is not None:
        if em not in models:
            yield Problem(("routing", "embedding_model"), f"unknown model '{em}' (models: {_names(list(models))})")
        elif Category.EMBED not in models[em].categories:
            why = f"model '{em}' does not list 'embed' in its categories"
            yield Problem(("routing", "embedding_model"), why, Severity.WARNING)


def _secret_refs(spec: ClusterSpec) -> Iterator[tuple[Path, str]]:
    if spec.gateway is not None:
        yield ("gateway", "master_key"), spec.gateway.master_key
    for n, node in enumerate(spec.nodes):
        if node.ssh is not None and node.ssh.sudo_password is not None:
            yield ("nodes", n, "ssh", "sudo_password"), node.ssh.sudo_password
        if node.wake is not None and node.wake.stdin is not None:
            yield ("nodes", n, "wake", "stdin"), node.wake.stdin


def _secrets(spec: ClusterSpec) -> Iterator[Problem]:
    for path, ref in _secret_refs(spec):
        if ref.startswith("secret:") and ref[7:] not in spec.secrets:
            yield Problem(path, f"unknown secret '{ref[7:]}' (secrets: {_names(list(spec.secrets))})")


def _gateway(spec: ClusterSpec) -> Iterator[Problem]:
    gw = spec.gateway
    if gw is None:
        return
    names = [node.name for node in spec.nodes]
    if gw.node is not None and gw.node not in names:
        yield Problem(("gateway", "node"), f"unknown node '{gw.node}' (nodes: {_names(names)})")
    if gw.node is not None and gw.mode == "container":
        node = next((n for n in spec.nodes if n.name == gw.node), None)
        if node is not None and node.docker is None:
            yield Problem(("gateway", "node"), f"node '{gw.node}' has no `docker` to run the gateway container")
    if gw.auto_model in {model.name for model in spec.models}:
        yield Problem(("gateway", "auto_model"), f"'{gw.auto_model}' is also a model name")


def _health(spec: ClusterSpec) -> Iterator[Problem]:
    known = {node.name for node in spec.nodes} | {model.name for model in spec.models} | {"gateway"}
    for key in spec.health.timeouts:
        if key not in known:
            yield Problem(
                ("health", "timeouts", key),
                f"'{key}' is not a node, a model or `gateway`",
                at_key=True,
            )


# Flags of llama-server that homelab writes itself (controller.core.desired.llama_server_args), each with
# its short and long spellings, and the spec key that sets it.
OWNED_FLAGS: dict[str, str] = {
    **dict.fromkeys(("-m", "--model", "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file"), "source"),
    **dict.fromkeys(("--host",), "llamacpp.bind_address"),
    **dict.fromkeys(("--port",), "port (or the node's llamacpp.ports)"),
    **dict.fromkeys(("-c", "--ctx-size"), "context"),
    **dict.fromkeys(("-ngl", "--gpu-layers", "--n-gpu-layers"), "placement (the solver sets the GPU layers)"),
    **dict.fromkeys(("-a", "--alias"), "alias"),
    **dict.fromkeys(("-ctk", "--cache-type-k", "-ctv", "--cache-type-v"), "kv_cache"),
    **dict.fromkeys(("-fa", "--flash-attn", "--no-flash-attn"), "flash_attn"),
    **dict.fromkeys(("-np", "--parallel"), "parallel"),
    **dict.fromkeys(("-t", "--threads"), "llamacpp.threads"),
    **dict.fromkeys(
        ("-sm", "--split-mode", "-ts", "--tensor-split", "-mg", "--main-gpu", "-dev", "--device"),
        "placement (the solver chooses the GPUs and the split)",
    ),
}


def runs_homelab(node: Node) -> bool:
    """The node is the machine homelab runs on: a loopback address and no `ssh` section (as
    `controller.drivers.ssh.is_local` decides where commands for it run)."""
    if node.ssh is not None:
        return False
    if node.address.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(node.address.strip("[]")).is_loopback
    except ValueError:
        return False


def _power(spec: ClusterSpec) -> Iterator[Problem]:
    """A node that sleeps must be wakeable and reachable over SSH, and neither the gateway's node (every request
    passes through it) nor the machine homelab runs on (nothing would be left to wake it)."""
    gateway_node = spec.gateway.node if spec.gateway is not None else None
    for n, node in enumerate(spec.nodes):
        if node.power is None:
            continue
        at: Path = ("nodes", n, "power")
        if node.name == gateway_node:
            yield Problem(at, f"node '{node.name}' runs the gateway and cannot sleep: every request passes through it",
                          at_key=True)  # fmt: skip
        elif runs_homelab(node):
            yield Problem(at, f"node '{node.name}' is the machine homelab runs on and cannot sleep: nothing would"
                          " be left to wake it", at_key=True)  # fmt: skip
        elif node.ssh is None:
            yield Problem(at, "needs `ssh`: the sleep command runs on the node over SSH", at_key=True)
        if node.wake is None:
            yield Problem(at, "needs `wake` (wol or command): a node homelab puts to sleep must be woken again",
                          at_key=True)  # fmt: skip


def owned_flag(arg: str) -> str | None:
    """The flag of `arg` if homelab sets it itself (`-ngl`, `--port=8080`, `-c8192` …), else None."""
    flag = arg.split("=", 1)[0]
    if flag in OWNED_FLAGS:
        return flag
    for short in ("-c", "-t", "-ngl", "-np", "-ts", "-sm", "-mg"):
        if flag.startswith(short) and flag[len(short) :].isdigit():
            return short
    return None


def _owned_args(spec: ClusterSpec) -> Iterator[Problem]:
    def check(args: list[str], base: Path) -> Iterator[Problem]:
        for i, arg in enumerate(args):
            flag = owned_flag(arg)
            if flag is not None:
                yield Problem(
                    (*base, i), f"'{flag}' is set by homelab from the spec's {OWNED_FLAGS[flag]}; remove it here"
                )

    for n, node in enumerate(spec.nodes):
        if node.llamacpp is not None:
            yield from check(node.llamacpp.server_args, ("nodes", n, "llamacpp", "server_args"))
    for m, model in enumerate(spec.models):
        if model.runtime is Runtime.LLAMACPP:
            yield from check(model.args, ("models", m, "args"))


def command_keys(spec: ClusterSpec) -> list[tuple[Path, str]]:
    """Every key of the spec that makes homelab run a command (through a shell, on the machine it runs on or on a
    node) or write a file where the spec says: the keys marked in the model's `EFFECTS` (`specs.model.Effect`) set
    to other than their default, and every `cmd:` secret reference. A spec is code: whoever can change the spec
    can run these. (path, what) each, in the order of the model's fields."""
    found: list[tuple[Path, str]] = []
    _effects_of(spec, (), found)
    return found


def _effects_of(section: BaseModel, base: Path, found: list[tuple[Path, str]]) -> None:
    cls = type(section)
    effects: Mapping[str, Effect] = getattr(cls, "EFFECTS", {})
    for name, info in cls.model_fields.items():
        value = getattr(section, name)
        path = (*base, name)
        effect = effects.get(name)
        if effect is not None and effect.kind != "harmless":
            default = info.get_default(call_default_factory=True)
            for sub, item in _items(value, path):
                if effect.kind == "secret":
                    hit = isinstance(item, str) and item.startswith("cmd:")
                else:
                    was = default.get(sub[-1]) if isinstance(default, Mapping) and sub != path else default
                    hit = item is not None and item != was
                if hit:
                    found.append((sub, effect.what))
        for sub, item in _items(value, path):
            if isinstance(item, BaseModel):
                _effects_of(item, sub, found)


def _items(value: object, path: Path) -> Iterator[tuple[Path, object]]:
    """A field's value, or each item of a list or mapping field, with its path (an enum key by its value)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield (*path, key.value if isinstance(key, Enum) else key), item
    elif isinstance(value, (list, tuple)) and not _is_command_list(value):
        for i, item in enumerate(value):
            yield (*path, i), item
    else:
        yield path, value


def _is_command_list(value: list[object] | tuple[object, ...]) -> bool:
    """A list of words (gateway.command, args): one value, not a list of sections."""
    return all(isinstance(item, str) for item in value) and bool(value)
