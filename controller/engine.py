"""One reconcile, from spec to plan: observe → place → render → diff → plan.

The only I/O here is what the drivers do while observing; everything after is
pure. `prepare()` is what `homelab reconcile`, its dry run and (later) the watch
loop share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from controller.desired import render
from controller.diff import DiffResult, diff
from controller.drivers.base import DockerNode, Gateway, OllamaNode
from controller.drivers.gpu import GpuProbe
from controller.gpuuse import GpuReality, observe_gpus
from controller.observe import observe, observe_gateway, ollama_model_info
from controller.plan import Plan, make_plan
from controller.state import ClusterState, GatewayState
from solver.gguf import read_header
from solver.place import SolveParams, place
from solver.problem import CurrentAssignment, PlacementResult
from solver.profiles import profiles_for
from specs.model import ClusterSpec, Node


@dataclass(frozen=True)
class Prepared:
    placement: PlacementResult
    desired: ClusterState
    observed: ClusterState
    diff: DiffResult
    plan: Plan
    gpus: GpuReality | None = None
    """What the GPUs really hold (None when not discovered): foreign use, smaller or missing GPUs."""


class CachingConnect:
    """Opens each node's driver once, so observe and apply share connections."""

    def __init__(self, factory: Callable[[Node], DockerNode]) -> None:
        self.factory = factory
        self.opened: dict[str, DockerNode] = {}

    def __call__(self, node: Node) -> DockerNode:
        if node.name not in self.opened:
            self.opened[node.name] = self.factory(node)
        return self.opened[node.name]

    def close(self) -> None:
        """Close every driver opened (those that can be: the Docker SDK client, an SSH tunnel)."""
        for driver in self.opened.values():
            close = getattr(driver, "close", None)
            if callable(close):
                close()
        self.opened.clear()


class CachingOllama:
    """Opens each node's Ollama driver once (the HTTP one unless a factory is given)."""

    def __init__(self, factory: Callable[[Node], OllamaNode] | None = None) -> None:
        self.factory = factory
        self.opened: dict[str, OllamaNode] = {}

    def __call__(self, node: Node) -> OllamaNode:
        if node.name not in self.opened:
            if self.factory is not None:
                self.opened[node.name] = self.factory(node)
            else:
                from controller.drivers.ollama import OllamaHttp

                assert node.ollama is not None
                self.opened[node.name] = OllamaHttp(node.name, node.ollama.url)
        return self.opened[node.name]


GatewayFactory = Callable[[GatewayState], Gateway]
"""Opens the gateway driver for the desired gateway (the local one, or a fake in tests)."""


def local_gateway(state_dir: Path) -> GatewayFactory:
    from controller.drivers.litellm import LocalGateway

    return lambda desired: LocalGateway(desired, state_dir)


def gateways(spec: ClusterSpec, connect: Callable[[Node], DockerNode], state_dir: Path) -> GatewayFactory:
    """The gateway as the spec runs it: mode container through its node's Docker engine (`connect`, so observe
    and apply share the connection), the others on this machine."""
    from controller.drivers.litellm import ContainerGateway, LocalGateway

    def make(desired: GatewayState) -> Gateway:
        if desired.mode == "container" and desired.node is not None:
            return ContainerGateway(desired, connect(spec.node(desired.node)), spec.cluster.name)
        return LocalGateway(desired, state_dir)

    return make


def current_placement(observed: ClusterState) -> dict[tuple[str, int], CurrentAssignment]:
    """Where managed replicas run now, for the solver's stability objective."""
    out: dict[tuple[str, int], CurrentAssignment] = {}
    for node in observed.nodes.values():
        for c in node.containers:
            if c.config is None:
                continue  # unreadable config label: its place is unknown, and it will be replaced anyway
            out[c.model, c.replica] = CurrentAssignment(node.node, c.config.gpus, c.config.gpu_layers)
    return out


def current_ports(observed: ClusterState) -> dict[tuple[str, str], int]:
    return {(node.node, c.name): c.config.port for node in observed.nodes.values() for c in node.containers if c.config}


def prepare(
    spec: ClusterSpec,
    connect: Callable[[Node], DockerNode],
    params: SolveParams | None = None,
    gpu_probe: GpuProbe | None = None,
    *,
    ollama: Callable[[Node], OllamaNode] | None = None,
    gateway: GatewayFactory | None = None,
) -> Prepared:
    """`gpu_probe` (e.g. `controller.drivers.gpu.discover_gpus`) makes the placement leave memory held by
    other processes alone and plan smaller or missing GPUs as they are (`controller.gpuuse`)."""
    # Ollama servers are observed through `ollama` (default: HTTP); the gateway through `gateway`
    # when given (without it, the gateway is neither observed nor planned).
    ollama = ollama if ollama is not None else CachingOllama()
    observed = observe(spec, connect, ollama)
    gpus = observe_gpus(spec, observed, connect, gpu_probe) if gpu_probe is not None else None
    placement = place(
        spec,
        profiles_for(spec, read_header=read_header, ollama_info=ollama_model_info(spec, observed, ollama)),
        current=current_placement(observed),
        foreign_vram=gpus.foreign_vram if gpus is not None else None,
        params=params or SolveParams(time_limit=10.0, workers=1),
    )
    desired = render(spec, placement, current_ports(observed))
    planned = desired
    if gateway is not None and desired.gateway is not None:
        observed = replace(observed, gateway=observe_gateway(desired.gateway, gateway(desired.gateway)))
    else:
        planned = replace(desired, gateway=None)
    result = diff(planned, observed)
    plan = make_plan(spec.cluster.name, result, observed.fingerprint())
    return Prepared(placement, desired, observed, result, plan, gpus)
