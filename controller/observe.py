"""Read the actual state of every node, concurrently, through its driver.

A node whose engine does not answer is observed as unreachable — never as
empty — so the plan does not try to recreate everything on it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from controller.drivers.base import DockerNode, DriverError
from controller.state import ClusterState, FileState, NodeState
from specs.model import ClusterSpec, Node

Connect = Callable[[Node], DockerNode]
"""Opens a node's Docker driver (the real one, or a fake in tests)."""


def observe_node(node: Node, cluster: str, connect: Connect) -> NodeState:
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
    except DriverError as exc:
        return NodeState(node=node.name, reachable=False, error=str(exc))
    return NodeState(
        node=node.name,
        volumes=tuple(sorted(volumes, key=lambda v: v.name)),
        files=tuple(sorted(files, key=lambda f: (f.volume, f.name))),
        containers=tuple(sorted(containers, key=lambda c: c.name)),
        foreign_containers=tuple(sorted(foreign)),
    )


def observe(spec: ClusterSpec, connect: Connect) -> ClusterState:
    """Every node of the spec, observed in parallel."""
    nodes = spec.nodes
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(nodes)))) as pool:
        states = list(pool.map(lambda n: observe_node(n, spec.cluster.name, connect), nodes))
    return ClusterState(cluster=spec.cluster.name, nodes={s.node: s for s in states})
