"""Planned versus actual VRAM per managed model, for `homelab status`.

Planned: the `vram_bytes` the placement gives the replica — the placement
`controller.effects.engine.Session.resolve` makes, as for a reconcile (this
module places nothing) — and a replica counts as planned only where it runs on
the node the placement puts it on. Actual: what `nvidia-smi` reports for the container's
processes (`docker top` PIDs matched to `--query-compute-apps`). A model using
more than planned by over `OVER_PLAN_FRACTION` (10 %) is flagged.
"""

from __future__ import annotations

from collections.abc import Callable

from controller.core.state import ClusterState, pool_container_name
from controller.drivers.base import DockerNode
from controller.effects.gpu_use import GpuReality, ModelVram, actual_vram, managed_pids
from solver.explain import gib
from solver.problem import PlacementResult
from specs.model import ClusterSpec, Node

StatusKey = tuple[str, str]
"""(node, container name)."""


def planned_vs_actual(
    spec: ClusterSpec,
    observed: ClusterState,
    connect: Callable[[Node], DockerNode],
    reality: GpuReality,
    placement: PlacementResult,
) -> dict[StatusKey, ModelVram]:
    """Per running managed container: the VRAM `placement` (`Session.resolve`'s) plans for it and what its
    processes hold (`reality`: what discovery found)."""
    pids = managed_pids(spec, observed, connect)
    planned = {(a.node, a.model, a.replica): sum(a.vram_bytes.values()) for a in placement.assignments}
    pools = {(p.node, pool_container_name(p.key)): p.size_bytes for p in placement.pools if p.gpu is not None}
    out: dict[StatusKey, ModelVram] = {}
    for node in observed.nodes.values():
        for c in node.containers:
            if c.status != "running":
                continue
            report = reality.reports.get(node.node)
            container_pids = pids.get(node.node, {}).get(c.name, frozenset())
            out[node.node, c.name] = ModelVram(
                c.name,
                pools.get((node.node, c.name)) if c.pool else planned.get((node.node, c.model, c.replica)),
                actual_vram(report, container_pids),
            )
    return out


def describe(v: ModelVram) -> str:
    """`VRAM planned 9.8 GiB, actual 11.2 GiB (+14%, OVER PLAN)`."""
    planned = gib(v.planned_bytes) if v.planned_bytes is not None else "not planned here"
    actual = gib(v.actual_bytes) if v.actual_bytes is not None else "not seen by nvidia-smi"
    text = f"VRAM planned {planned}, actual {actual}"
    if v.over_by is not None:
        text += f" ({v.over_by:+.0%}{', OVER PLAN' if v.over_plan else ''})"
    return text
