"""The placement problem, prepared once for both solvers (CP-SAT and greedy), and its result.

`build_problem` turns a spec and memory profiles into replicas, GPU slots,
usable capacities and, per replica, the candidate GPUs and CPU nodes that the
hard constraints (runtime, pins, ports, cpu_only, cpu_offload, min_gpu_layers)
and a quick "does it fit at its fewest layers" filter leave. Everything here is
pure and in bytes; the CP-SAT model scales to MiB itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from solver.estimate import LayerCurve, SplitCurve
from solver.profiles import MemoryProfile, NoEstimate, Profile, as_profile
from specs.enums import Runtime
from specs.model import ClusterSpec, Model, Node

GpuKey = tuple[str, int]
"""(node name, GPU index)."""
ReplicaKey = tuple[str, int]
"""(model name, replica number from 0)."""


@dataclass(frozen=True)
class CurrentAssignment:
    """Where a replica runs now (for stability)."""

    node: str
    gpus: tuple[int, ...] = ()
    gpu_layers: int | None = None
    """Its -ngl now; None when unknown. Changing it restarts the replica as surely as moving it."""
    any_gpu: bool = False
    """It has GPU layers but was given no GPU device (its node's `gpu_access: none`): which of its node's GPUs the
    placement counts them on does not show in how it runs, so any of them is where it runs now."""

    def same_place(self, node: str, gpus: tuple[int, ...]) -> bool:
        """Whether a placement on `node` and `gpus` leaves it where it runs now."""
        if node != self.node:
            return False
        if self.any_gpu:
            return bool(gpus)
        return tuple(sorted(gpus)) == tuple(sorted(self.gpus))


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class Assignment:
    model: str
    replica: int
    node: str
    gpus: tuple[int, ...]
    gpu_layers: int
    layers: int
    """L+1: the most GPU layers the model can have (ngl of full offload)."""
    vram_bytes: Mapping[int, int]
    ram_bytes: int
    context: int
    layers_per_gpu: Mapping[int, int] = field(default_factory=dict)
    """For a replica split over several GPUs: the layers on each GPU index (blocks, and the output
    layer on the last GPU), summing to `gpu_layers`; what `--tensor-split` says. Empty otherwise."""
    on_demand: bool = False
    """A member of the swap pool on (node, gpus[0]) (or the node's CPU pool when `gpus` is empty):
    `vram_bytes`/`ram_bytes` are what it needs while loaded, counted in the pool's size, not on their own."""

    @property
    def split(self) -> bool:
        return len(self.gpus) > 1

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "model": self.model,
            "replica": self.replica,
            "node": self.node,
            "gpus": list(self.gpus),
            "gpu_layers": self.gpu_layers,
            "layers": self.layers,
            "vram_bytes": {str(k): v for k, v in sorted(self.vram_bytes.items())},
            "ram_bytes": self.ram_bytes,
            "context": self.context,
        }
        if self.layers_per_gpu:
            out["layers_per_gpu"] = {str(k): v for k, v in sorted(self.layers_per_gpu.items())}
        if self.on_demand:
            out["on_demand"] = True
        return out


@dataclass(frozen=True)
class Pool:
    """The memory reserved on one GPU (or, with `gpu` None, one node's RAM) for its on-demand models.

    `size_bytes` is the sum of the `max_loaded` largest members' needs (each with its own weights,
    context, KV cache, compute buffer and per-process overhead), so any `max_loaded` of them fit
    beside the pinned models at once.
    """

    node: str
    gpu: int | None
    runtime: Runtime
    members: tuple[str, ...]
    """Model names, sorted."""
    max_loaded: int
    size_bytes: int
    ram_bytes: int = 0
    """Host memory the same `max_loaded` largest members need while loaded (partial offload, CPU buffers)."""

    @property
    def key(self) -> str:
        """A stable name for the pool: NODE-gpuI, or NODE-cpu."""
        return f"{self.node}-cpu" if self.gpu is None else f"{self.node}-gpu{self.gpu}"

    def to_json(self) -> dict[str, object]:
        return {
            "node": self.node,
            "gpu": self.gpu,
            "runtime": str(self.runtime),
            "members": list(self.members),
            "max_loaded": self.max_loaded,
            "size_bytes": self.size_bytes,
            "ram_bytes": self.ram_bytes,
        }


@dataclass(frozen=True)
class Unplaced:
    model: str
    replica: int
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"model": self.model, "replica": self.replica, "reason": self.reason}


@dataclass(frozen=True)
class GpuUse:
    node: str
    index: int
    name: str
    capacity_bytes: int
    """Usable: VRAM − reserve − memory used by processes homelab doesn't manage."""
    used_bytes: int
    """Pinned models plus the swap pool (`pool_bytes`)."""
    pool_bytes: int = 0

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "node": self.node,
            "index": self.index,
            "capacity_bytes": self.capacity_bytes,
            "used_bytes": self.used_bytes,
        }
        if self.pool_bytes:
            out["pool_bytes"] = self.pool_bytes
        return out


@dataclass(frozen=True)
class PlacementResult:
    """A plan: where every replica goes, which could not go anywhere and why."""

    status: str
    """OPTIMAL (proven best), FEASIBLE (best found within the time limit) or INFEASIBLE."""
    assignments: tuple[Assignment, ...]
    unplaced: tuple[Unplaced, ...]
    gpus: tuple[GpuUse, ...]
    objective: int
    """The priority/layers score (`score`), comparable between solvers."""
    moves: int = 0
    solver: str = "cp-sat"
    notes: tuple[str, ...] = ()
    """One sentence per replica placed with fewer GPU layers than it has."""
    bound: int | None = None
    """A proven upper bound on `objective` over every feasible plan (None for greedy); equal to it
    when OPTIMAL and there is no current placement (moves may cost layers)."""
    solver_gap: float | None = None
    """A proven gap in % for a solver whose bound is not in `objective`'s terms (unused by CP-SAT)."""
    pools: tuple[Pool, ...] = ()
    """One per GPU (or CPU node) that holds on-demand models, sorted by key."""

    @property
    def gap(self) -> float | None:
        """How far the plan may be from the best possible, in % (None without a proof)."""
        if self.bound is None:
            return self.solver_gap
        return 100.0 * (self.bound - self.objective) / self.objective if self.objective else 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "status": self.status,
            "assignments": [a.to_json() for a in self.assignments],
            "unplaced": [u.to_json() for u in self.unplaced],
            "gpus": [g.to_json() for g in self.gpus],
            "pools": [p.to_json() for p in self.pools],
        }


# --------------------------------------------------------------------------- problem


@dataclass(frozen=True)
class Choice:
    """One replica's decision: GPU (index into problem.gpus) or CPU node, and its GPU layers.

    A replica split over several GPUs has `gpu` None and `split` the (GPU, blocks) of each GPU it
    uses, in GPU index order (the output layer on the last); it is fully offloaded.
    """

    key: ReplicaKey
    node: str
    gpu: int | None
    ngl: int
    split: tuple[tuple[int, int], ...] = ()

    @property
    def on_gpu(self) -> bool:
        return self.gpu is not None or bool(self.split)

    def gpu_slots(self) -> tuple[int, ...]:
        """Indices into problem.gpus of the GPUs it uses."""
        if self.split:
            return tuple(gi for gi, _ in self.split)
        return () if self.gpu is None else (self.gpu,)


@dataclass(frozen=True)
class Replica:
    model: Model
    index: int
    curves: Mapping[str, LayerCurve]
    """Per candidate node."""
    profile: MemoryProfile
    needs: Mapping[str, LinearNeed]
    """Per candidate node: the memory both solvers count."""
    splits: Mapping[str, SplitNeed] = field(default_factory=dict)
    """Per node where it may be split over several GPUs (`placement.split`), in units."""

    @property
    def key(self) -> ReplicaKey:
        return (self.model.name, self.index)

    @property
    def n_layers(self) -> int:
        """L+1, the ngl of full offload."""
        return self.profile.curve.layers + 1

    def ngl_range(self) -> tuple[int, int]:
        """(lowest, highest) ngl allowed on a GPU, from the model's placement rules."""
        top = self.n_layers
        if not self.model.placement.cpu_offload or self.model.on_demand:
            # An on-demand model is a swap-pool member: fully offloaded on a GPU (or in a CPU pool).
            return top, top
        return max(1, self.model.placement.min_gpu_layers), top

    def cpu_allowed(self) -> bool:
        p = self.model.placement
        return p.cpu_offload and p.min_gpu_layers == 0


@dataclass(frozen=True)
class GpuSlot:
    node: str
    index: int
    name: str
    capacity: int

    @property
    def key(self) -> GpuKey:
        return (self.node, self.index)


@dataclass
class Problem:
    spec: ClusterSpec
    replicas: list[Replica]
    gpus: list[GpuSlot]
    node_ram: dict[str, int]
    """Usable RAM per node: ram − ram_reserve."""
    gpu_cands: dict[ReplicaKey, list[int]] = field(default_factory=dict)
    """Indices into `gpus`."""
    cpu_cands: dict[ReplicaKey, list[str]] = field(default_factory=dict)
    blocked: dict[ReplicaKey, str] = field(default_factory=dict)
    """Replicas that cannot be placed at all, with the reason."""
    current: Mapping[ReplicaKey, CurrentAssignment] = field(default_factory=dict)
    port_slots: dict[str, int] = field(default_factory=dict)
    """How many llamacpp replicas each llamacpp node can host (its port range)."""
    split_cands: dict[ReplicaKey, dict[str, list[int]]] = field(default_factory=dict)
    """Per replica that may be split: node → its GPUs (indices into `gpus`, in GPU index order)."""

    def node(self, name: str) -> Node:
        return self.spec.node(name)

    def max_loaded(self, node: str, runtime: Runtime) -> int:
        """How many on-demand models one pool of `runtime` on `node` holds loaded at once."""
        n = self.spec.node(node)
        rt = n.llamacpp if runtime is Runtime.LLAMACPP else n.ollama
        return 1 if rt is None else rt.max_loaded


def vram_at(curve: LayerCurve, ngl: int) -> int:
    """VRAM of a replica at `ngl`; 0 layers means no GPU at all."""
    return 0 if ngl == 0 else curve.vram(ngl)


def ram_at(curve: LayerCurve, ngl: int) -> int:
    return curve.ram(ngl)


def node_allows(node: Node, model: Model) -> str | None:
    """Why `model` cannot run on `node` at all, or None."""
    p = model.placement
    if model.runtime not in node.runtimes:
        return f"node {node.name} does not offer {model.runtime.value}"
    if p.node is not None and node.name != p.node:
        return f"pinned to node {p.node}"
    if p.tier is not None and node.tier is not p.tier:
        return f"pinned to tier {p.tier.value}"
    if model.runtime is Runtime.LLAMACPP and model.source.node is not None and node.name != model.source.node:
        return f"its file is on node {model.source.node} (source.node)"
    if model.runtime is Runtime.LLAMACPP and model.port is not None:
        assert node.llamacpp is not None
        if model.port not in node.llamacpp.ports:
            r = node.llamacpp.ports
            return f"port {model.port} is outside node {node.name}'s range {r.start}-{r.end}"
    return None


def _why_no_node(spec: ClusterSpec, model: Model) -> str:
    reasons = [node_allows(n, model) for n in spec.nodes]
    p = model.placement
    if p.node is not None:
        try:
            node = spec.node(p.node)
        except KeyError:
            return f"{model.name} is pinned to node {p.node}, which is not in the spec"
        why = node_allows(node, model)
        return f"{model.name} is pinned to node {p.node}, but {why}"
    if p.tier is not None and not any(n.tier is p.tier for n in spec.nodes):
        return f"{model.name} is pinned to tier {p.tier.value}, which has no node"
    if not any(model.runtime in n.runtimes for n in spec.nodes):
        return f"{model.name} runs on {model.runtime.value}, which no node offers"
    detail = "; ".join(sorted({r for r in reasons if r is not None}))
    return f"no node can run {model.name}: {detail}"


def build_problem(
    spec: ClusterSpec,
    profiles: Mapping[str, Profile],
    current: Mapping[ReplicaKey, CurrentAssignment] | None = None,
    foreign_vram: Mapping[GpuKey, int] | None = None,
) -> Problem:
    """Replicas, GPUs, capacities and candidates for `spec` (see the module docstring)."""
    foreign = foreign_vram or {}
    gpus = [
        GpuSlot(n.name, g.index, g.name, max(0, g.vram - g.reserve - foreign.get((n.name, g.index), 0)))
        for n in spec.nodes
        for g in n.gpus
    ]
    memo: dict[tuple[LayerCurve, int], LinearNeed] = {}

    def need_of(curve: LayerCurve, lo: int) -> LinearNeed:
        # Nodes and models often share a curve: compute each need once.
        if (curve, lo) not in memo:
            memo[curve, lo] = linear_need(curve, lo)
        return memo[curve, lo]

    prob = Problem(
        spec=spec,
        replicas=[],
        gpus=gpus,
        node_ram={n.name: n.ram - n.ram_reserve for n in spec.nodes},
        current=dict(current or {}),
        port_slots={n.name: len(n.llamacpp.ports) for n in spec.nodes if n.llamacpp is not None},
    )
    for model in spec.models:
        raw = profiles.get(model.name, NoEstimate())
        prof = as_profile(raw)
        keys = [(model.name, i) for i in range(model.replicas)]
        if isinstance(prof, NoEstimate):
            for k in keys:
                prob.blocked[k] = f"{model.name}: {prof.reason}"
            continue
        nodes = [n for n in spec.nodes if node_allows(n, model) is None]
        curves = {n.name: prof.for_node(n.name) for n in nodes}
        lo_all = max(1, model.placement.min_gpu_layers) if model.placement.cpu_offload else prof.curve.layers + 1
        needs = {n: need_of(c, lo_all) for n, c in curves.items()}
        splits = {n: split_need(sc) for n, sc in prof.node_splits.items() if n in curves}
        for i in range(model.replicas):
            rep = Replica(model, i, curves, prof, needs, splits)
            prob.replicas.append(rep)
            if not nodes:
                prob.blocked[rep.key] = _why_no_node(spec, model)
                continue
            lo, hi = rep.ngl_range()
            p = model.placement
            gc: list[int] = []
            if not p.cpu_only and lo <= hi:
                for gi, slot in enumerate(gpus):
                    if slot.node not in curves:
                        continue
                    if p.gpus is not None and slot.index not in p.gpus:
                        continue
                    if fits_vram(needs[slot.node], lo, hi, units_down(slot.capacity)):
                        gc.append(gi)
            cc: list[str] = []
            if rep.cpu_allowed():
                cc = [n.name for n in nodes if needs[n.name].r0 <= units_down(prob.node_ram[n.name])]
            prob.gpu_cands[rep.key] = gc
            prob.cpu_cands[rep.key] = cc
            sc: dict[str, list[int]] = {}
            if not p.cpu_only and hi == rep.n_layers and not model.on_demand:
                for n_name, sn in splits.items():
                    gis = [
                        gi
                        for gi, slot in enumerate(gpus)
                        if slot.node == n_name and (p.gpus is None or slot.index in p.gpus)
                    ]
                    caps = sorted((units_down(gpus[gi].capacity) for gi in gis), reverse=True)
                    # Worth modelling only if two GPUs or more together could hold it.
                    if len(gis) >= 2 and sn.ram <= units_down(prob.node_ram[n_name]) and sum(caps) >= sn.least_total:
                        sc[n_name] = gis
            if sc:
                prob.split_cands[rep.key] = sc
    return prob


def fits_vram(need: LinearNeed, lo: int, hi: int, cap: int) -> bool:
    """Whether some ngl in lo … hi fits in `cap` VRAM units (RAM aside)."""
    if hi == need.top and need.v_full <= cap:
        return True
    k_lo, k_hi = need.partial_range(lo, cap, 1 << 62)
    return lo < need.top and k_lo <= min(k_hi, hi)


def score(problem: Problem, assignments: list[Assignment] | tuple[Assignment, ...]) -> int:
    """The priority/layers objective: placed replicas by priority, then GPU layers by priority.

    Placing one more replica outweighs any number of GPU layers (a pinned replica counts
    `placed_weights`, above every on-demand one together); each GPU layer of a pinned model counts
    priority + 1 (an on-demand member's are not counted: it is fully offloaded or in a CPU pool).
    """
    w = placement_weight(problem)
    pw = placed_weights(problem)
    lw = {m.name: 0 if m.on_demand else m.priority + 1 for m in problem.spec.models}
    return sum(pw[a.model] * w + lw[a.model] * a.gpu_layers for a in assignments)


def placed_weights(problem: Problem) -> dict[str, int]:
    """Per model, the worth of one placed replica in stage 1 (placement).

    An on-demand model counts priority + 1; a pinned one (priority + 1) × (1 + all on-demand
    replicas' worth together), so placing pinned models comes first and on-demand ones next.
    Without on-demand models this is priority + 1, as before.
    """
    od = 1 + sum(r.model.priority + 1 for r in problem.replicas if r.model.on_demand)
    return {m.name: (m.priority + 1) * (1 if m.on_demand else od) for m in problem.spec.models}


def top_k_sum(values: list[int], k: int) -> int:
    """The sum of the `k` largest of `values` (all of them when there are fewer)."""
    return sum(sorted(values, reverse=True)[:k])


def pools_of(problem: Problem, assignments: list[Assignment] | tuple[Assignment, ...]) -> tuple[Pool, ...]:
    """The swap pools that the on-demand assignments make, sorted by key: per (node, GPU or CPU, runtime),
    sized as the sum of the runtime's `max_loaded` largest members' VRAM (and, apart, RAM) needs."""
    groups: dict[tuple[str, int | None, Runtime], list[Assignment]] = {}
    for a in assignments:
        if a.on_demand:
            model = problem.spec.model(a.model)
            groups.setdefault((a.node, a.gpus[0] if a.gpus else None, model.runtime), []).append(a)
    pools = []
    for (node, gpu, runtime), members in groups.items():
        k = problem.max_loaded(node, runtime)
        pools.append(
            Pool(
                node=node,
                gpu=gpu,
                runtime=runtime,
                members=tuple(sorted(a.model for a in members)),
                max_loaded=k,
                size_bytes=top_k_sum([sum(a.vram_bytes.values()) for a in members], k),
                ram_bytes=top_k_sum([a.ram_bytes for a in members], k),
            )
        )
    return tuple(sorted(pools, key=lambda p: p.key))


def placement_weight(problem: Problem) -> int:
    """Worth of one placed replica of priority 0: more than all GPU layers together."""
    return 1 + sum((r.model.priority + 1) * r.n_layers for r in problem.replicas)


UNIT = 1 << 16
"""Memory inside the solvers is counted in 64 KiB units: needs rounded up, capacities down."""


def units_up(n: int) -> int:
    return -(-n // UNIT)


def units_down(n: int) -> int:
    return n // UNIT


@dataclass(frozen=True)
class LinearNeed:
    """A replica's memory on one node as both solvers count it, in `UNIT`s.

    Full offload (ngl = top = L+1) and CPU only (ngl = 0) are exact; partial
    offload (plo ≤ ngl ≤ L) is the smallest affine upper bound a + b·ngl with an
    integer slope through the curve's points, so a plan that fits here fits in bytes.
    """

    top: int
    plo: int
    v_full: int
    a_v: int
    b_v: int
    r_full: int
    r0: int
    a_r: int
    b_r: int

    def vram(self, ngl: int) -> int:
        if ngl == 0:
            return 0
        return self.v_full if ngl == self.top else self.a_v + self.b_v * ngl

    def ram(self, ngl: int) -> int:
        if ngl == 0:
            return self.r0
        return self.r_full if ngl == self.top else self.a_r + self.b_r * ngl

    def full_fits(self, vram: int, ram: int) -> bool:
        return self.v_full <= vram and self.r_full <= ram

    def partial_range(self, lo: int, vram: int, ram: int) -> tuple[int, int]:
        """(lowest, highest) partial ngl ≥ lo that fit in `vram` and `ram` units; empty when lowest > highest."""
        k_lo, k_hi = max(lo, self.plo, 1), self.top - 1
        for a, b, limit in ((self.a_v, self.b_v, vram), (self.a_r, self.b_r, ram)):
            # a + b·ngl ≤ limit
            if b > 0:
                k_hi = min(k_hi, (limit - a) // b)
            elif b < 0:
                k_lo = max(k_lo, -(-(a - limit) // -b))
            elif a > limit:
                return 1, 0
        return k_lo, k_hi


def _table(curve: LayerCurve, per_block: tuple[int, ...], fixed: tuple[int, int, int], sign: int) -> list[int]:
    """fixed[regime(ngl)] + sign·(the first blocks(ngl) blocks), for ngl = 0 … L+1, from prefix sums."""
    prefix = [0]
    for b in per_block:
        prefix.append(prefix[-1] + b)
    return [fixed[curve.regime(k)] + sign * prefix[curve.blocks(k)] for k in range(curve.layers + 2)]


def linear_need(curve: LayerCurve, lo: int) -> LinearNeed:
    """The `LinearNeed` of `curve` for GPU layers from `lo` (≥ 1) up."""
    top = curve.layers + 1
    plo = max(lo, 1)
    vt = [units_up(v) for v in _table(curve, curve.gpu_per_block, curve.gpu_fixed, 1)]
    vt[0] = 0
    rt = [units_up(r) for r in _table(curve, curve.cpu_per_block, curve.cpu_fixed, -1)]
    a_v = b_v = a_r = b_r = 0
    if plo <= curve.layers:
        span = max(curve.layers - plo, 1)
        b_v = -(-(vt[curve.layers] - vt[plo]) // span)
        b_r = -(-(rt[curve.layers] - rt[plo]) // span)
        a_v = max(vt[k] - b_v * k for k in range(plo, curve.layers + 1))
        a_r = max(rt[k] - b_r * k for k in range(plo, curve.layers + 1))
    return LinearNeed(top, plo, vt[top], a_v, b_v, rt[top], rt[0], a_r, b_r)


@dataclass(frozen=True)
class SplitNeed:
    """A `SplitCurve` in `UNIT`s for the solvers: every block rounded up on its own, so that a device's
    blocks [a, b) need at most prefix[b] − prefix[a] units however the bytes fall."""

    prefix: tuple[int, ...]
    """prefix[k]: units of blocks 0 … k−1 (prefix[0] = 0, prefix[L] = all blocks)."""
    output: int
    fixed: int
    """Per GPU used."""
    ram: int

    @property
    def layers(self) -> int:
        return len(self.prefix) - 1

    @property
    def least_total(self) -> int:
        """Units over all GPUs of the cheapest split (two GPUs)."""
        return self.prefix[-1] + self.output + 2 * self.fixed

    def devices(self, blocks: tuple[int, ...] | list[int]) -> list[int]:
        """Units per device for `blocks` consecutive blocks per device (output on the last)."""
        out: list[int] = []
        start = 0
        for j, b in enumerate(blocks):
            last = j == len(blocks) - 1
            body = self.prefix[start + b] - self.prefix[start] + (self.output if last else 0)
            out.append(body + (self.fixed if b > 0 or last else 0))
            start += b
        return out


def split_need(curve: SplitCurve) -> SplitNeed:
    prefix = [0]
    for b in curve.block_bytes:
        prefix.append(prefix[-1] + units_up(b))
    return SplitNeed(
        tuple(prefix), units_up(curve.output_bytes), units_up(curve.device_fixed), units_up(curve.ram_bytes)
    )
