"""One reconcile, from spec to plan: observe → place → render → diff → plan.

The only I/O here is what the drivers do while observing; everything after is
pure. `prepare()` is what `homelab reconcile`, its dry run and (later) the watch
loop share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from controller.desired import render
from controller.diff import DiffResult, diff
from controller.drivers.base import DockerNode
from controller.observe import observe
from controller.plan import Plan, make_plan
from controller.state import ClusterState
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


class CachingConnect:
    """Opens each node's driver once, so observe and apply share connections."""

    def __init__(self, factory: Callable[[Node], DockerNode]) -> None:
        self.factory = factory
        self.opened: dict[str, DockerNode] = {}

    def __call__(self, node: Node) -> DockerNode:
        if node.name not in self.opened:
            self.opened[node.name] = self.factory(node)
        return self.opened[node.name]


def current_placement(observed: ClusterState) -> dict[tuple[str, int], CurrentAssignment]:
    """Where managed replicas run now, for the solver's stability objective."""
    out: dict[tuple[str, int], CurrentAssignment] = {}
    for node in observed.nodes.values():
        for c in node.containers:
            gpus = c.config.gpus if c.config is not None else ()
            out[c.model, c.replica] = CurrentAssignment(node.node, gpus)
    return out


def current_ports(observed: ClusterState) -> dict[tuple[str, str], int]:
    return {(node.node, c.name): c.config.port for node in observed.nodes.values() for c in node.containers if c.config}


def prepare(spec: ClusterSpec, connect: Callable[[Node], DockerNode], params: SolveParams | None = None) -> Prepared:
    observed = observe(spec, connect)
    placement = place(
        spec,
        profiles_for(spec, read_header=read_header),
        current=current_placement(observed),
        params=params or SolveParams(time_limit=10.0, workers=1),
    )
    desired = render(spec, placement, current_ports(observed))
    result = diff(desired, observed)
    plan = make_plan(spec.cluster.name, result, observed.fingerprint())
    return Prepared(placement, desired, observed, result, plan)
