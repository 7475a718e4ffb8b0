"""What the GPUs really hold, set against the spec: memory held by others, smaller or missing GPUs.

Pure but for `observe_gpus` (I/O only through the probe and driver it is
given): `assess` reads what `controller.drivers.gpu` discovered, the managed
containers' PIDs and the observed state, and returns

- `foreign_vram` for `solver.place.place` — per (node, GPU index), bytes the
  solver must leave alone;
- `notes` for the plan ("GPU 0 on local: 3.1 GiB held by other processes"); and
- `warnings` (a GPU missing or smaller than the spec says; discovery failed on
  a node, so other processes' use there is unknown and the spec's figures are used).

**Whose memory is it.** A process listed by `nvidia-smi --query-compute-apps`
is homelab's when its PID is one of a running managed container's processes
(`docker top`), or, on a node with an `ollama` runtime, when its name contains
"ollama" (the spec's Ollama server holds the memory of the Ollama models the
plan puts there). Every other process is foreign. Memory the GPU reports as
used that no listed process accounts for (graphics processes such as a
desktop, which the compute-apps query does not list) is counted as foreign too,
but only when every managed container on that GPU was found among the processes
— otherwise it may be homelab's own model whose process is hidden from
nvidia-smi (Docker Desktop), and it is left out.

**Margin.** Foreign use below FOREIGN_NOISE_BYTES (64 MiB) is ignored. Above
it, the solver is told the use plus max(256 MiB, 5 %) of it, because other
programs' allocations grow (PyTorch's caching allocator, a browser's GPU
process).

**Smaller or missing GPU.** A GPU the spec lists (matched by `uuid` when the
spec gives one, else by index) that the node does not have is planned with no
memory at all; one with less memory than the spec says is planned with the
smaller figure (the difference is added to `foreign_vram`). Both are warnings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from controller.core.state import ClusterState
from controller.drivers.base import DockerNode, DriverError
from controller.drivers.gpu import GpuInfo, GpuProbe, GpuProcess, NodeGpus
from solver.explain import gib
from specs.model import ClusterSpec, Gpu, Node

GIB = 2**30
MIB = 2**20
FOREIGN_NOISE_BYTES = 64 * MIB
FOREIGN_MARGIN_MIN_BYTES = 256 * MIB
FOREIGN_MARGIN_FRACTION = 0.05

ManagedPids = Mapping[str, Mapping[str, frozenset[int]]]
"""node → managed container name → its host PIDs."""


def with_margin(foreign: int) -> int:
    """What the solver leaves free for `foreign` bytes of other processes (see the module docstring)."""
    if foreign < FOREIGN_NOISE_BYTES:
        return 0
    return foreign + max(FOREIGN_MARGIN_MIN_BYTES, int(foreign * FOREIGN_MARGIN_FRACTION))


@dataclass(frozen=True)
class GpuFinding:
    """One GPU of the spec, as found on its node."""

    node: str
    index: int
    found: GpuInfo | None
    foreign_bytes: int
    """Memory held by other processes (before the margin)."""
    shortfall_bytes: int
    """How much less memory the GPU has than the spec says (all of it for a missing GPU)."""
    foreign_processes: tuple[GpuProcess, ...] = ()

    @property
    def withheld_bytes(self) -> int:
        """What the solver is told to leave alone on this GPU."""
        return self.shortfall_bytes + with_margin(self.foreign_bytes)

    def to_json(self) -> dict[str, object]:
        return {
            "node": self.node,
            "index": self.index,
            "found": self.found is not None,
            "total_bytes": self.found.total_bytes if self.found is not None else None,
            "foreign_bytes": self.foreign_bytes,
            "shortfall_bytes": self.shortfall_bytes,
            "withheld_bytes": self.withheld_bytes,
            "foreign_processes": [p.to_json() for p in self.foreign_processes],
        }


@dataclass(frozen=True)
class GpuReality:
    findings: tuple[GpuFinding, ...] = ()
    notes: tuple[str, ...] = ()
    """For the plan: memory held by other processes, per GPU."""
    warnings: tuple[str, ...] = ()
    """GPU missing or smaller than the spec; discovery failed on a node."""
    reports: Mapping[str, NodeGpus] = field(default_factory=dict)

    @property
    def foreign_vram(self) -> dict[tuple[str, int], int]:
        return {(f.node, f.index): f.withheld_bytes for f in self.findings if f.withheld_bytes > 0}

    def to_json(self) -> dict[str, object]:
        return {
            "gpus": [f.to_json() for f in self.findings],
            "notes": list(self.notes),
            "warnings": list(self.warnings),
        }


def probed_nodes(spec: ClusterSpec) -> list[Node]:
    """Nodes whose GPUs reconcile looks at: the spec gives them GPUs that NVIDIA's tools can see."""
    return [
        n
        for n in spec.nodes
        if n.gpus and (n.docker is None or n.docker.gpu_access.value == "nvidia" or n.ollama is not None)
    ]


def match_gpu(report: NodeGpus, gpu: Gpu) -> GpuInfo | None:
    """The discovered GPU a spec GPU is: by uuid when the spec has one, else by index."""
    if gpu.uuid:
        return report.gpu(uuid=gpu.uuid)
    return report.gpu(index=gpu.index)


def owned_by_homelab(proc: GpuProcess, node: Node, pids: frozenset[int]) -> bool:
    return proc.pid in pids or (node.ollama is not None and "ollama" in proc.name.lower())


def assess(
    spec: ClusterSpec,
    reports: Mapping[str, NodeGpus],
    managed_pids: ManagedPids,
    observed: ClusterState | None = None,
) -> GpuReality:
    """Set what was discovered against the spec (see the module docstring)."""
    findings: list[GpuFinding] = []
    notes: list[str] = []
    warnings: list[str] = []
    for node in spec.nodes:
        report = reports.get(node.name)
        if report is None:
            continue
        if report.error is not None:
            warnings.append(
                f"{report.error}; memory held by other processes on its GPUs is unknown:"
                " planning with the spec's figures"
            )
            continue
        node_pids = managed_pids.get(node.name, {})
        all_pids = frozenset().union(*node_pids.values()) if node_pids else frozenset()
        for gpu in node.gpus:
            found = match_gpu(report, gpu)
            if found is None:
                how = f"uuid {gpu.uuid}" if gpu.uuid else f"index {gpu.index}"
                warnings.append(
                    f"GPU {gpu.index} on {node.name}: in the spec ({gpu.name}, {gib(gpu.vram)}) but not on the node"
                    f" (no GPU with {how}): planning it with no memory"
                )
                findings.append(GpuFinding(node.name, gpu.index, None, 0, gpu.vram))
                continue
            shortfall = 0
            if found.total_bytes is not None and found.total_bytes < gpu.vram:
                shortfall = gpu.vram - found.total_bytes
                warnings.append(
                    f"GPU {gpu.index} on {node.name}: the spec says {gib(gpu.vram)}, the node has"
                    f" {gib(found.total_bytes)} ({found.name}): planning with {gib(found.total_bytes)}"
                    " (`homelab discover --write` updates the spec)"
                )
            foreign, procs = _foreign_use(node, found, report, node_pids, all_pids, observed)
            finding = GpuFinding(node.name, gpu.index, found, foreign, shortfall, procs)
            findings.append(finding)
            if with_margin(foreign) > 0:
                notes.append(foreign_note(finding))
        if report.processes is None:
            warnings.append(f"node {node.name}: GPU processes unknown; memory held by other processes not counted")
    return GpuReality(tuple(findings), tuple(notes), tuple(warnings), dict(reports))


def foreign_note(f: GpuFinding) -> str:
    """`GPU 0 on local: 3.1 GiB held by other processes (python3 422: 3.1 GiB); 3.4 GiB kept free for them`."""
    listed = ", ".join(
        f"{p.name} {p.pid}: {gib(p.used_bytes) if p.used_bytes is not None else 'unknown'}" for p in f.foreign_processes
    )
    unlisted = f.foreign_bytes - sum(p.used_bytes or 0 for p in f.foreign_processes)
    if unlisted >= MIB:
        listed = f"{listed}, not listed: {gib(unlisted)}" if listed else f"not listed by nvidia-smi: {gib(unlisted)}"
    detail = f" ({listed})" if listed else ""
    return (
        f"GPU {f.index} on {f.node}: {gib(f.foreign_bytes)} held by other processes{detail};"
        f" {gib(with_margin(f.foreign_bytes))} kept free for them"
    )


def _foreign_use(
    node: Node,
    gpu: GpuInfo,
    report: NodeGpus,
    node_pids: Mapping[str, frozenset[int]],
    all_pids: frozenset[int],
    observed: ClusterState | None,
) -> tuple[int, tuple[GpuProcess, ...]]:
    procs = [p for p in report.processes or () if p.gpu_uuid == gpu.uuid]
    if not procs and len(report.gpus) == 1:
        # A process on a UUID no GPU has (a MIG device) belongs to the node's only GPU.
        procs = [p for p in report.processes or () if report.gpu(uuid=p.gpu_uuid) is None]
    foreign = tuple(p for p in procs if not owned_by_homelab(p, node, all_pids))
    total = sum(p.used_bytes or 0 for p in foreign)
    listed = sum(p.used_bytes or 0 for p in procs)
    if (
        gpu.used_bytes is not None
        and gpu.used_bytes > listed
        and _managed_all_seen(node, gpu, procs, node_pids, observed)
    ):
        total += gpu.used_bytes - listed
    return total, foreign


def _managed_all_seen(
    node: Node,
    gpu: GpuInfo,
    procs: list[GpuProcess],
    node_pids: Mapping[str, frozenset[int]],
    observed: ClusterState | None,
) -> bool:
    """Every running managed container on this GPU has a process in `procs` (so none is hidden)."""
    if observed is None or node.name not in observed.nodes:
        return not node_pids
    seen = {p.pid for p in procs}
    for c in observed.nodes[node.name].containers:
        if c.status != "running" or c.config is None or gpu.index not in c.config.gpus or c.pool:
            continue  # a swap pool has a process on its GPU only while a member is loaded
        if not (node_pids.get(c.name, frozenset()) & seen):
            return False
    return True


# --------------------------------------------------------------------------- planned vs actual

OVER_PLAN_FRACTION = 0.10
"""A model using more than planned by over this share is flagged in `homelab status`."""


@dataclass(frozen=True)
class ModelVram:
    container: str
    planned_bytes: int | None
    actual_bytes: int | None

    @property
    def over_plan(self) -> bool:
        if self.planned_bytes is None or self.actual_bytes is None or self.planned_bytes <= 0:
            return False
        return self.actual_bytes > self.planned_bytes * (1 + OVER_PLAN_FRACTION)

    @property
    def over_by(self) -> float | None:
        """actual / planned − 1 (0.23 for 23 % over)."""
        if self.planned_bytes is None or self.actual_bytes is None or self.planned_bytes <= 0:
            return None
        return self.actual_bytes / self.planned_bytes - 1


def actual_vram(report: NodeGpus | None, pids: frozenset[int]) -> int | None:
    """GPU memory nvidia-smi reports for these processes; None when unknown or none of them is listed."""
    if report is None or report.processes is None or not pids:
        return None
    mine = [p for p in report.processes if p.pid in pids]
    if not mine or any(p.used_bytes is None for p in mine):
        return None
    return sum(p.used_bytes or 0 for p in mine)


# --------------------------------------------------------------------------- observing (I/O through its arguments)


def managed_pids(
    spec: ClusterSpec, observed: ClusterState, connect: Callable[[Node], DockerNode]
) -> dict[str, dict[str, frozenset[int]]]:
    """PIDs of every running managed container on the probed nodes; a node that fails gives none."""
    out: dict[str, dict[str, frozenset[int]]] = {}
    for node in probed_nodes(spec):
        state = observed.nodes.get(node.name)
        if state is None or not state.reachable or node.docker is None:
            continue
        pids: dict[str, frozenset[int]] = {}
        try:
            engine = connect(node)
            for c in state.containers:
                if c.status == "running":
                    pids[c.name] = frozenset(engine.container_pids(c.name))
        except DriverError:
            continue
        out[node.name] = pids
    return out


def observe_gpus(
    spec: ClusterSpec, observed: ClusterState, connect: Callable[[Node], DockerNode], probe: GpuProbe
) -> GpuReality:
    """Discover the GPUs of the nodes that have some in the spec, and set them against it."""
    nodes = probed_nodes(spec)
    reports = probe(nodes) if nodes else {}
    return assess(spec, reports, managed_pids(spec, observed, connect), observed)
