"""Read the actual state of every node, concurrently, through its driver.

A node whose engine does not answer is observed as unreachable — never as
empty — so the plan does not try to recreate everything on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from controller.core.importer import container_argv, container_ports, model_mount, parse_server_args
from controller.core.state import (
    GATEWAY_CONTAINER,
    LABEL_CLUSTER,
    OLLAMA_PREFIX,
    ClusterState,
    FileState,
    ForeignContainer,
    GatewayState,
    NodeState,
    OllamaNodeState,
    ollama_tag,
)
from controller.drivers.base import DockerNode, DriverError, Gateway, NodeUnreachable, OllamaNode
from solver.profiles import OllamaInfo
from specs.enums import Runtime
from specs.model import ClusterSpec, Node

SERVICE_CONTAINERS = (GATEWAY_CONTAINER,)
"""Service containers homelab may run on a node."""

Connect = Callable[[Node], DockerNode]
"""Opens a node's Docker driver (the real one, or a fake in tests)."""


OllamaConnect = Callable[[Node], OllamaNode]
"""Opens a node's Ollama driver (the HTTP one, or a fake in tests)."""


def observe_ollama(node: Node, connect: OllamaConnect) -> OllamaNodeState | None:
    """Tags on the server (prune candidates), and homelab's derived models with their parameters."""
    if node.ollama is None:
        return None
    url = node.ollama.url
    try:
        driver = connect(node)
        names = driver.list_models()
        loaded = set(driver.loaded())
        ours = [name for name in names if name.startswith(OLLAMA_PREFIX)]
        models = [replace(state, preload=state.name in loaded) for state in driver.derived_many(ours)]
    except DriverError as exc:
        return OllamaNodeState(url=url, reachable=False, error=str(exc))
    return OllamaNodeState(
        url=url,
        tags=tuple(sorted(n for n in names if not n.startswith(OLLAMA_PREFIX))),
        models=tuple(sorted(models, key=lambda m: m.name)),
    )


def ollama_model_info(spec: ClusterSpec, observed: ClusterState, connect: OllamaConnect) -> dict[str, OllamaInfo]:
    """For each Ollama model without a declared `memory:`: what /api/show says of its tag, from a node that has it."""
    out: dict[str, OllamaInfo] = {}
    for model in spec.models:
        if model.runtime is not Runtime.OLLAMA or model.memory is not None or model.source.ollama is None:
            continue
        tag = ollama_tag(model.source.ollama)
        for node in spec.nodes:
            state = observed.nodes.get(node.name)
            have = state.ollama if state is not None else None
            if node.ollama is None or have is None or not have.reachable or tag not in have.tags:
                continue
            try:
                data = connect(node).model_info(tag)
            except DriverError:
                continue
            info, details = data.get("model_info"), data.get("details")
            quant = details.get("quantization_level") if isinstance(details, dict) else None
            out[model.name] = (info if isinstance(info, dict) else {}, quant if isinstance(quant, str) else None)
            break
    return out


def observe_gateway(desired: GatewayState | None, driver: Gateway | None) -> GatewayState | None:
    """The config file as it is, and (for a proxy homelab runs) whether it answers /health/liveliness."""
    if desired is None or driver is None:
        return None
    try:
        text = driver.read_config()
        # mode container: how its container runs now ("" none); a different hash means re-creating it.
        run_hash = driver.container_hash() if desired.mode == "container" else ""
    except OSError as exc:
        raise DriverError(f"gateway config {desired.path}: cannot read: {exc.strerror}") from None
    except NodeUnreachable:
        # mode container on a node that does not answer: its changes are deferred, never planned as if empty.
        return replace(desired, text=None, running=False, run_hash="")
    alive = driver.alive() if desired.mode != "external" else True
    return replace(desired, text=text, running=alive, run_hash=run_hash)


def observe_node(node: Node, cluster: str, connect: Connect, ollama: OllamaConnect | None = None) -> NodeState:
    state = _observe_docker(node, cluster, connect)
    if node.ollama is not None and ollama is not None:
        state = replace(state, ollama=observe_ollama(node, ollama))
    return state


def _unlabelled(inspect: Mapping[str, Any]) -> bool:
    return LABEL_CLUSTER not in ((inspect.get("Config") or {}).get("Labels") or {})


def foreign_container(inspect: Mapping[str, Any]) -> ForeignContainer:
    """An unlabelled container's name, host ports and (when it reads its model through a bind mount) that mount."""
    name = str(inspect.get("Name", "")).lstrip("/")
    model = parse_server_args(container_argv(inspect)).model
    mount = model_mount(inspect, model) if model is not None else None
    bind = mount.name if mount is not None and mount.kind == "bind" else None
    return ForeignContainer(name, tuple(container_ports(inspect)), bind)


def _observe_docker(node: Node, cluster: str, connect: Connect) -> NodeState:
    if node.docker is None:
        return NodeState(node=node.name)
    try:
        engine = connect(node)
        engine.ping()
        containers, foreign = engine.list_containers(cluster)
        volumes = engine.list_volumes(cluster)
        files: list[FileState] = []
        for v in volumes:
            files.extend(engine.list_files(v.name))
        services = [name for name in SERVICE_CONTAINERS if engine.service_status(name) is not None]
        unlabelled = [foreign_container(c) for c in engine.inspect_all() if _unlabelled(c)]
        volume_names = engine.volume_names()
    except DriverError as exc:
        return NodeState(node=node.name, reachable=False, error=str(exc))
    return NodeState(
        node=node.name,
        volumes=tuple(sorted(volumes, key=lambda v: v.name)),
        files=tuple(sorted(files, key=lambda f: (f.volume, f.name))),
        containers=tuple(sorted(containers, key=lambda c: c.name)),
        foreign_containers=tuple(sorted(foreign)),
        foreign=tuple(sorted(unlabelled, key=lambda f: f.name)),
        volume_names=tuple(sorted(volume_names)),
        services=tuple(services),
    )


def observe(spec: ClusterSpec, connect: Connect, ollama: OllamaConnect | None = None) -> ClusterState:
    """Every node of the spec, observed in parallel (Ollama servers too, when `ollama` is given)."""
    nodes = spec.nodes
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(nodes)))) as pool:
        states = list(pool.map(lambda n: observe_node(n, spec.cluster.name, connect, ollama), nodes))
    return ClusterState(cluster=spec.cluster.name, nodes={s.node: s for s in states})
