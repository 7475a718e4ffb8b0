"""Placement: which node, which GPU and how many GPU layers for every model replica (CP-SAT).

`place()` is pure: the spec, one memory profile per model (`solver.profiles`),
optionally the current placement (for stability) and the VRAM that processes
homelab doesn't manage hold on each GPU. It builds one CP-SAT model and solves
it in three lexicographic stages, each keeping the value the earlier ones reached:

1. placed replicas weighted by priority;
2. replicas moved away from their current node/GPU/layers (each move counts
   as much as all GPU layers together), then GPU layers weighted by priority;
3. replicas split over several GPUs, then the highest GPU utilisation
   (headroom balanced).

Moves rank above GPU layers: a model that runs is not moved (a restart, and a
reload of its weights) to give another model a few more layers on a GPU. With
no current placement this is the issue's order exactly; to re-pack a running
cluster for the most GPU layers, place it without `current`.

Solving the stages apart rather than as one weighted sum is what finds good
plans in time: on the bench's 100-model clusters, stage 1 alone reaches a
placement that one weighted objective did not reach in the same work (an
objective of 1.5971e9 against 1.5805e9 on one instance), because the search
and its cuts see the small placement objective rather than a sum dominated by
huge weights.

The model is direct: per (replica, candidate GPU) a Boolean `x`, and where the
replica can run partly offloaded on that GPU alone, a Boolean `partial` and its
layer count, bounded by the most layers that fit on that GPU and node alone;
full offload is x − partial. Pairs where neither regime fits alone are left out.
Memory is counted in 64 KiB units, every need rounded up and every capacity
rounded down, so a plan the model accepts fits in bytes too. A replica with 0
GPU layers runs without a GPU (RAM only).

Stage 1 starts from a complete hint: first-fit decreasing, or, when a current
placement is given and scores no worse, the current placement kept where it
still fits; or, where that scores strictly better, first-fit around `solver.fill`'s
exact fill (GPUs filled with the least slack: tight packings such as Falkenauer's
triplets, where first-fit leaves models out). A stage whose start already has the
best value possible is not solved, and a stage that ends below its start (CP-SAT's
presolve can lose a complete hint) keeps the start. Stage 2 starts from stage 1's plan, or from that hint when it places
as much and scores better, so the result never scores below first-fit's (with
no current placement). OPTIMAL means CP-SAT proved every stage optimal;
otherwise the result is FEASIBLE and `PlacementResult.bound` is what is proven:
stage 1's bound on placement, plus stage 2's bound on layers when stages 1 and 2
are optimal (else every layer of every replica). When CP-SAT finds nothing in
time, the result is greedy's. The time limit covers all stages, and a stage
that ends early leaves its time to the next.

Larger clusters (more than `LNS_MIN_PAIRS` replica-GPU pairs, e.g. 100 models
on 30 GPUs) are not built as one model: for 500 models on 100 GPUs loading it
alone outlasts the budget on a small machine, and already at 100 × 30 the stages
leave GPU layers far from the best in the budget. `_solve_lns` starts from first-fit's plan and lets CP-SAT
re-optimise a few nodes at a time (large-neighbourhood search, deterministic),
with a per-node knapsack relaxation for the bound; its result is FEASIBLE,
solver "cp-sat-lns".

Multi-GPU split (`placement.split: true`, llama.cpp models): besides the
single-GPU pairs, a replica may run fully offloaded over two or more GPUs of
one node (`--split-mode layer`). Per (replica, node) a Boolean `split`, and per
GPU of that node (in index order) a Boolean "used", its number of blocks, a
Boolean "holds the output layer" (the last GPU used) and the running total of
blocks; that GPU's VRAM is the estimator's bytes of exactly its blocks (an
element constraint on the prefix sums of the per-block need), plus the output
layer where it is, plus the compute buffer and overhead every GPU used needs
(`solver.estimate.split_curve`). A split replica is not partially offloaded.
A current replica on several GPUs stays when it is split over exactly those
GPUs with the same layers; how its blocks are divided between them is not
known from the current placement and may change.

Swap pools (`residency: on-demand`, issue 17): an on-demand replica has the same `x` (fully offloaded
only: `Replica.ngl_range`) and CPU variables, but its memory is not counted on its own: per GPU, and per
node's CPU, and per runtime, a pool whose size is the sum of the runtime's `max_loaded` largest members'
needs (`_TopK`: pool ≥ k·t + Σ s_i, s_i ≥ need_i·x_i − t, s_i ≥ 0; pool ≥ need_i·x_i for k = 1; the
plain sum when every candidate fits at once), for VRAM and, apart, RAM. A Boolean per pool says it has a
member: at most one pool per GPU (and per node's CPU), so its members share a runtime, and a llama.cpp
pool takes one port. Stage 1 counts a placed pinned replica above all on-demand ones together
(`placed_weights`); stage 2's layers are the pinned models', and after them it keeps on-demand models out
of CPU pools. The large-cluster path builds the same pools in each neighbourhood (a neighbourhood holds
whole nodes, so whole pools).

Same input, same parameters → same plan: the default is one worker, for which
CP-SAT is deterministic (it was also the faster setting measured); with
several workers the search is CP-SAT's deterministic interleaved search.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from solver.explain import explain
from solver.fill import FILL_STEPS, exact_fill, full_gpus
from solver.greedy import greedy_assign
from solver.problem import (
    Assignment,
    Choice,
    CurrentAssignment,
    GpuKey,
    GpuUse,
    LinearNeed,
    PlacementResult,
    Problem,
    ReplicaKey,
    SplitNeed,
    build_problem,
    placed_weights,
    placement_weight,
    pools_of,
    ram_at,
    score,
    top_k_sum,
    units_down,
    vram_at,
)
from solver.profiles import Profile
from specs.enums import Runtime
from specs.lazy import LazyModule
from specs.model import ClusterSpec

if TYPE_CHECKING:
    from ortools.sat.python import cp_model

    Expr = cp_model.LinearExpr
else:  # OR-Tools only when a command places
    cp_model = LazyModule("ortools.sat.python.cp_model")
UTIL_SCALE = 1000
"""GPU utilisation is measured in permille in the balance objective."""
PRESOLVE_MAX_PAIRS = 8000
"""Above this many (replica, GPU) pairs CP-SAT's presolve takes most of a 10 s budget: skip it."""
WALL_CAP = 3.0
"""With a deterministic budget, the stages together still run at most this many times the limit in seconds."""


@dataclass(frozen=True)
class SolveParams:
    time_limit: float = 10.0
    """Seconds for both stages together."""
    workers: int = 1
    seed: int = 0
    deterministic: bool = True
    """Budget the search in CP-SAT's deterministic time (work done, not seconds elapsed), so the
    same input gives the same plan however loaded the machine is — a controller that re-plans on
    every run must not reshuffle models because the CPU was busy. Wall time is then capped at
    WALL_CAP × the budget; only past that cap can load change the answer."""


def place(
    spec: ClusterSpec,
    profiles: Mapping[str, Profile],
    current: Mapping[ReplicaKey, CurrentAssignment] | None = None,
    foreign_vram: Mapping[GpuKey, int] | None = None,
    params: SolveParams | None = None,
) -> PlacementResult:
    """The best placement of `spec` (see the module docstring)."""
    params = params or SolveParams()
    start = time.monotonic()
    problem = build_problem(spec, profiles, current, foreign_vram)
    return solve(problem, params, start)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class _OnGpu:
    """The variables of one replica on one candidate GPU.

    `x`: the replica runs here. `partial`: it runs here partially offloaded with
    `layers` GPU layers (None where partial offload cannot fit on this GPU alone;
    `x` itself where full offload cannot). Full offload is x − partial.
    """

    x: cp_model.IntVar
    full_ok: bool
    partial: cp_model.IntVar | None
    layers: cp_model.IntVar | None
    top: int


@dataclass(frozen=True)
class _Split:
    """The variables of one replica split over GPUs of one node (see the module docstring)."""

    on: cp_model.IntVar
    gpus: tuple[int, ...]
    """Indices into problem.gpus, in GPU index order."""
    used: tuple[cp_model.IntVar, ...]
    blocks: tuple[cp_model.IntVar, ...]
    output: tuple[cp_model.IntVar, ...]
    cum: tuple[cp_model.IntVar, ...]
    prefix: tuple[cp_model.IntVar, ...]
    """Units of the blocks up to and including this GPU's (an element of the prefix table)."""
    top: int


@dataclass(frozen=True)
class _TopK:
    """A linear upper bound on the sum of the `k` largest of `values[i]·member_i` (a pool's size):
    pool ≥ k·t + Σ s_i, s_i ≥ value_i·member_i − t, s_i ≥ 0 (pool ≥ value_i·member_i for k = 1; the plain
    sum when every member fits at once). `pool` is None where every value is 0."""

    k: int
    values: tuple[int, ...]
    pool: cp_model.IntVar | None
    t: cp_model.IntVar | None
    s: tuple[cp_model.IntVar, ...]

    def expr(self, members: list[cp_model.IntVar]) -> Expr:
        if self.pool is not None:
            return self.pool
        return cp_model.LinearExpr.weighted_sum(members, list(self.values))


@dataclass(frozen=True)
class _PoolVars:
    """One swap pool's variables: a GPU's (`gpu` an index into problem.gpus) or a node's CPU (`gpu` None)."""

    node: str
    gpu: int | None
    runtime: Runtime
    keys: tuple[ReplicaKey, ...]
    members: tuple[cp_model.IntVar, ...]
    used: cp_model.IntVar
    """The pool has a member (it needs a container, and a port for llama.cpp)."""
    vram: _TopK
    ram: _TopK


@dataclass
class _Model:
    model: cp_model.CpModel
    x: dict[tuple[ReplicaKey, int], _OnGpu]
    """x[r, g]: replica r on GPU g (index into problem.gpus), with its layer variables."""
    c: dict[tuple[ReplicaKey, str], cp_model.IntVar]
    """c[r, n]: replica r runs on node n's CPU only."""
    sp: dict[tuple[ReplicaKey, str], _Split]
    """sp[r, n]: replica r split over GPUs of node n."""
    ngl: dict[ReplicaKey, Expr]
    placed: dict[ReplicaKey, cp_model.IntVar]
    vram: dict[int, Expr]
    """VRAM used on each GPU, in units."""
    placement: Expr
    """Priority-weighted placed replicas: stage 1's objective."""
    layers: Expr
    """Priority-weighted GPU layers."""
    moves: Expr
    util: cp_model.IntVar
    stays: dict[ReplicaKey, cp_model.IntVar]
    """stays[r]: replica r keeps its place and its GPU layers (only where its layers are known)."""
    pools: list[_PoolVars]


def _build(problem: Problem) -> _Model:
    # ----------------------------------------------------------------- data
    m = cp_model.CpModel()
    gpus = problem.gpus
    cap = [units_down(g.capacity) for g in gpus]
    node_ram = {n: units_down(b) for n, b in problem.node_ram.items()}
    reps = [r for r in problem.replicas if r.key not in problem.blocked]

    # ----------------------------------------------------------------- variables
    x: dict[tuple[ReplicaKey, int], _OnGpu] = {}
    c: dict[tuple[ReplicaKey, str], cp_model.IntVar] = {}
    sp: dict[tuple[ReplicaKey, str], _Split] = {}
    placed: dict[ReplicaKey, cp_model.IntVar] = {}
    ngl: dict[ReplicaKey, Expr] = {}
    vram_use: dict[int, list[Expr]] = defaultdict(list)
    ram_use: dict[str, list[Expr]] = defaultdict(list)
    on_node: dict[tuple[ReplicaKey, str], list[cp_model.IntVar]] = defaultdict(list)
    # On-demand members per pool: (GPU index or node name, runtime) → (replica, VRAM, RAM, variable).
    pool_in: dict[tuple[int | str, Runtime], list[tuple[ReplicaKey, int, int, cp_model.IntVar]]] = defaultdict(list)
    for r in reps:
        k = r.key
        tag = f"{k[0]}#{k[1]}"
        lo, hi = r.ngl_range()
        layer_terms: list[Expr] = []
        for gi in problem.gpu_cands[k]:
            node = gpus[gi].node
            need = r.needs[node]
            full_ok, plo, phi = _regimes(need, lo, hi, cap[gi], node_ram[node])
            if not full_ok and plo > phi:
                continue
            where = f"{tag},{node}:{gpus[gi].index}"
            xv = m.new_bool_var(f"x[{where}]")
            p: cp_model.IntVar | None = None
            nv: cp_model.IntVar | None = None
            full: Expr | None = None
            if full_ok and plo <= phi:
                p = m.new_bool_var(f"partial[{where}]")
                # On this GPU the replica runs partially offloaded (p) or fully (x − p).
                m.add_implication(p, xv)
                full = xv - p
            elif full_ok:
                full = xv
            else:
                p = xv
            terms_v: list[Expr] = []
            terms_r: list[Expr] = []
            if full is not None:
                terms_v.append(need.v_full * full)
                terms_r.append(need.r_full * full)
                layer_terms.append(need.top * full)
            if p is not None:
                nv = m.new_int_var(0, phi, f"ngl[{where}]")
                # Partial offload keeps plo … hi layers on the GPU (hi: what fits on it alone); none otherwise.
                m.add(nv >= plo * p)
                m.add(nv <= phi * p)
                terms_v.append(need.a_v * p + need.b_v * nv)
                terms_r.append(need.a_r * p + need.b_r * nv)
                layer_terms.append(nv)
            x[k, gi] = _OnGpu(xv, full_ok, p, nv, need.top)
            if r.model.on_demand:
                # A pool member, fully offloaded (ngl_range): counted in its pool's size, not on its own.
                pool_in[gi, r.model.runtime].append((k, need.v_full, need.r_full, xv))
            else:
                vram_use[gi].append(cp_model.LinearExpr.sum(terms_v))
                ram_use[node].append(cp_model.LinearExpr.sum(terms_r))
            on_node[k, node].append(xv)
        for node, gis in problem.split_cands.get(k, {}).items():
            spl = _split_vars(m, r.splits[node], gis, r.n_layers, f"{tag},{node}")
            sp[k, node] = spl
            for j, gi in enumerate(gis):
                before = spl.prefix[j - 1] if j else 0
                sn = r.splits[node]
                # This GPU's blocks, the output layer if it is the last used, and compute + overhead if used.
                vram_use[gi].append(spl.prefix[j] - before + sn.fixed * spl.used[j] + sn.output * spl.output[j])
            ram_use[node].append(r.splits[node].ram * spl.on)
            layer_terms.append(spl.top * spl.on)
            on_node[k, node].append(spl.on)
        for n in problem.cpu_cands[k]:
            c[k, n] = m.new_bool_var(f"c[{tag},{n}]")
            if r.model.on_demand:
                pool_in[n, r.model.runtime].append((k, 0, r.needs[n].r0, c[k, n]))
            else:
                # A CPU-only replica holds its whole RAM need on its node.
                ram_use[n].append(r.needs[n].r0 * c[k, n])
            on_node[k, n].append(c[k, n])
        placed[k] = m.new_bool_var(f"placed[{tag}]")
        ngl[k] = cp_model.LinearExpr.sum(layer_terms)

    # ----------------------------------------------------------------- constraints
    by_rep: dict[ReplicaKey, list[cp_model.IntVar]] = defaultdict(list)
    for (k, _), og in x.items():
        by_rep[k].append(og.x)
    for (k, _), cv in c.items():
        by_rep[k].append(cv)
    for (k, _), spl in sp.items():
        by_rep[k].append(spl.on)
    for r in reps:
        # A replica is placed on at most one GPU or one node's CPU.
        m.add(cp_model.LinearExpr.sum(by_rep[r.key]) == placed[r.key])
    # Swap pools: on each GPU (and each node's CPU) the on-demand members of one runtime, sized as the sum
    # of the runtime's max_loaded largest members' needs, so any allowed combination fits beside the pinned.
    pools: list[_PoolVars] = []
    by_place: dict[int | str, list[cp_model.IntVar]] = defaultdict(list)
    for (at, runtime), items in sorted(pool_in.items(), key=lambda kv: (str(kv[0][0]), kv[0][1].value)):
        pgi = at if isinstance(at, int) else None
        pnode = gpus[at].node if isinstance(at, int) else str(at)
        k_max = problem.max_loaded(pnode, runtime)
        tag = f"{pnode}:{'cpu' if pgi is None else gpus[pgi].index}:{runtime.value}"
        members = [v for _, _, _, v in items]
        used = m.new_bool_var(f"pool_used[{tag}]")
        for v in members:
            m.add_implication(v, used)
        m.add(used <= cp_model.LinearExpr.sum(members))
        pv = _top_k(m, [vv for _, vv, _, _ in items], members, k_max, f"pool_vram[{tag}]")
        pr = _top_k(m, [rr for _, _, rr, _ in items], members, k_max, f"pool_ram[{tag}]")
        pools.append(_PoolVars(pnode, pgi, runtime, tuple(k for k, _, _, _ in items), tuple(members), used, pv, pr))
        if pgi is not None:
            vram_use[pgi].append(pv.expr(members))
        ram_use[pnode].append(pr.expr(members))
        by_place[at].append(used)
    for lits in by_place.values():
        # One pool per GPU (and per node's CPU): its members share one runtime.
        if len(lits) > 1:
            m.add(cp_model.LinearExpr.sum(lits) <= 1)
    # Per-GPU VRAM: the placed replicas' GPU bytes fit in capacity − reserve − foreign use.
    vram: dict[int, Expr] = {}
    for gi, terms in vram_use.items():
        vram[gi] = cp_model.LinearExpr.sum(terms)
        m.add(vram[gi] <= cap[gi])
    # Per-node RAM: CPU-side layers, KV and buffers fit in ram − ram_reserve.
    for n, terms in ram_use.items():
        m.add(cp_model.LinearExpr.sum(terms) <= node_ram[n])
    # Replicas of one model run on different nodes.
    by_model_node: dict[tuple[str, str], list[cp_model.IntVar]] = defaultdict(list)
    for (k, n), lits in on_node.items():
        by_model_node[k[0], n].extend(lits)
    for lits in by_model_node.values():
        if len(lits) > 1:
            m.add(sum(lits) <= 1)
    # A llamacpp node hosts at most as many llamacpp replicas as its port range has ports,
    # and a fixed port at most once.
    llama: dict[str, list[cp_model.IntVar]] = defaultdict(list)
    fixed_port: dict[tuple[str, int], list[cp_model.IntVar]] = defaultdict(list)
    for (k, n), lits in on_node.items():
        model = problem.spec.model(k[0])
        if model.runtime is Runtime.LLAMACPP and not model.on_demand:
            llama[n].extend(lits)
            if model.port is not None:
                fixed_port[n, model.port].extend(lits)
    for pool in pools:
        # A llama.cpp pool is one router-mode llama-server: one port, whatever its members.
        if pool.runtime is Runtime.LLAMACPP:
            llama[pool.node].append(pool.used)
    for n, lits in llama.items():
        if len(lits) > problem.port_slots[n]:
            m.add(sum(lits) <= problem.port_slots[n])
    for lits in fixed_port.values():
        if len(lits) > 1:
            m.add(sum(lits) <= 1)
    # Replicas of one model are interchangeable: place them in order (symmetry breaking).
    for r in reps:
        nxt = (r.key[0], r.key[1] + 1)
        if nxt in placed:
            m.add(placed[r.key] >= placed[nxt])

    # ----------------------------------------------------------------- objective
    moved: list[Expr] = []
    stays: dict[ReplicaKey, cp_model.IntVar] = {}
    gpu_at = {g.key: gi for gi, g in enumerate(gpus)}
    for k, cur in problem.current.items():
        if k not in placed:
            continue
        # It is undisturbed only on exactly the GPU it runs on (one GPU a replica here), or on the
        # same node's CPU, and with the same number of GPU layers: anything else restarts it.
        here: cp_model.IntVar | None = None
        if len(cur.gpus) == 1 and (k, gpu_at.get((cur.node, cur.gpus[0]), -1)) in x:
            here = x[k, gpu_at[cur.node, cur.gpus[0]]].x
        elif not cur.gpus and (k, cur.node) in c:
            here = c[k, cur.node]
        elif len(cur.gpus) > 1 and (k, cur.node) in sp:
            here = _same_split(m, sp[k, cur.node], {gpu_at.get((cur.node, i), -1) for i in cur.gpus})
        if here is None:
            moved.append(cp_model.LinearExpr.constant(1))
            continue
        if cur.gpu_layers is None:
            stay = here
        else:
            stay = m.new_bool_var(f"stays[{k[0]}#{k[1]}]")
            # Staying means: same place and the same layers.
            m.add_implication(stay, here)
            m.add(ngl[k] == cur.gpu_layers).only_enforce_if(stay)
        stays[k] = stay
        moved.append(1 - stay)
    pw = placed_weights(problem)
    placement = cp_model.LinearExpr.sum([pw[r.model.name] * placed[r.key] for r in reps])
    # GPU layers of the pinned models: an on-demand member is fully offloaded or in a CPU pool, and which of the
    # two is stage 3's first choice, so that no pinned model loses layers to a model that is loaded now and then.
    layers = cp_model.LinearExpr.sum([(r.model.priority + 1) * ngl[r.key] for r in reps if not r.model.on_demand])
    util = m.new_int_var(0, UTIL_SCALE, "util")
    # The balance objective: every GPU's utilisation is at most `util` permille.
    for gi, expr in vram.items():
        if cap[gi] > 0:
            m.add(UTIL_SCALE * expr <= cap[gi] * util)
    return _Model(m, x, c, sp, ngl, placed, vram, placement, layers, cp_model.LinearExpr.sum(moved), util, stays, pools)


def _top_k(m: cp_model.CpModel, values: list[int], members: list[cp_model.IntVar], k: int, name: str) -> _TopK:
    """The sum of the k largest `values[i]` of the members chosen (see `_TopK`)."""
    if k >= len(values) or not any(values):
        return _TopK(k, tuple(values), None, None, ())
    ub = top_k_sum(values, k)
    pool = m.new_int_var(0, ub, name)
    if k == 1:
        for v, x in zip(values, members, strict=True):
            m.add(pool >= v * x)
        return _TopK(k, tuple(values), pool, None, ())
    t = m.new_int_var(0, max(values), f"{name}.t")
    ss = []
    for i, (v, x) in enumerate(zip(values, members, strict=True)):
        si = m.new_int_var(0, v, f"{name}.s{i}")
        m.add(si >= v * x - t)
        ss.append(si)
    m.add(pool >= k * t + cp_model.LinearExpr.sum(ss))
    return _TopK(k, tuple(values), pool, t, tuple(ss))


def _regimes(need: LinearNeed, lo: int, hi: int, vram: int, ram: int) -> tuple[bool, int, int]:
    """On one GPU (`vram`) and its node (`ram`), in units: whether full offload fits, and the
    partial-offload ngl range that does (empty when lowest > highest)."""
    full_ok = hi == need.top and need.full_fits(vram, ram)
    plo, phi = need.partial_range(lo, vram, ram) if lo < need.top else (1, 0)
    return full_ok, plo, phi


def _split_vars(m: cp_model.CpModel, need: SplitNeed, gis: list[int], top: int, where: str) -> _Split:
    """Variables and constraints of one replica split over the GPUs `gis` of one node."""
    n = need.layers
    assert n + 1 == top, "the split curve and the layer curve disagree on the layer count"
    on = m.new_bool_var(f"split[{where}]")
    used, blocks, output, cum, prefix = [], [], [], [], []
    prev: cp_model.IntVar | int = 0
    for j in range(len(gis)):
        u = m.new_bool_var(f"split_used[{where}:{j}]")
        b = m.new_int_var(0, n, f"split_blocks[{where}:{j}]")
        o = m.new_bool_var(f"split_output[{where}:{j}]")
        cu = m.new_int_var(0, n, f"split_cum[{where}:{j}]")
        pv = m.new_int_var(0, need.prefix[-1], f"split_prefix[{where}:{j}]")
        # Contiguous blocks in GPU order: the running total, and the units of the blocks so far.
        m.add(cu == prev + b)
        m.add_element(cu, list(need.prefix), pv)
        # A GPU is used iff it holds a block or the output layer.
        m.add(b <= n * u)
        m.add(o <= u)
        m.add(b + o >= u)
        used.append(u)
        blocks.append(b)
        output.append(o)
        cum.append(cu)
        prefix.append(pv)
        prev = cu
    # All blocks on the GPUs of a placed split, on two GPUs or more; the output layer on the last used one.
    m.add(cum[-1] == n * on)
    m.add(cp_model.LinearExpr.sum(used) >= 2 * on)
    m.add(cp_model.LinearExpr.sum(used) <= len(gis) * on)
    m.add(cp_model.LinearExpr.sum(output) == on)
    for j in range(len(gis)):
        for later in range(j + 1, len(gis)):
            m.add(output[j] + used[later] <= 1)
    return _Split(on, tuple(gis), tuple(used), tuple(blocks), tuple(output), tuple(cum), tuple(prefix), top)


def _same_split(m: cp_model.CpModel, spl: _Split, gpus: set[int]) -> cp_model.IntVar:
    """A Boolean that implies the replica is split over exactly `gpus` (indices into problem.gpus)."""
    same = m.new_bool_var("same_split")
    if not gpus <= set(spl.gpus):
        m.add(same == 0)
        return same
    m.add_implication(same, spl.on)
    for gi, u in zip(spl.gpus, spl.used, strict=True):
        if gi in gpus:
            m.add_implication(same, u)
        else:
            m.add_implication(same, u.Not())
    return same


# --------------------------------------------------------------------------- solve


def _solver(params: SolveParams, time_limit: float, pairs: int, wall: float | None = None) -> cp_model.CpSolver:
    s = cp_model.CpSolver()
    if params.deterministic:
        s.parameters.max_deterministic_time = max(0.05, time_limit)
        s.parameters.max_time_in_seconds = max(0.05, time_limit * WALL_CAP if wall is None else wall)
    else:
        s.parameters.max_time_in_seconds = max(0.05, time_limit)
    s.parameters.cp_model_presolve = pairs <= PRESOLVE_MAX_PAIRS
    s.parameters.num_workers = params.workers
    # Cuts from the full linear relaxation: on the bench's 100 × 30 clusters stage 1 found a plan
    # placing 5157 (priority-weighted) instead of 5124 in the same deterministic time.
    s.parameters.linearization_level = 2
    s.parameters.random_seed = params.seed
    if params.workers > 1:
        s.parameters.interleave_search = True
    return s


def _hint(mm: _Model, problem: Problem, chosen: list[Choice]) -> None:
    """Start the search from a known plan (greedy's, or stage 1's): every variable gets a value."""
    mm.model.clear_hints()  # type: ignore[no-untyped-call]
    by_key = {ch.key: ch for ch in chosen}
    reps = {r.key: r for r in problem.replicas}
    used: dict[int, int] = defaultdict(int)
    for (k, gi), og in mm.x.items():
        ch = by_key.get(k)
        here = ch is not None and ch.gpu == gi
        ngl = ch.ngl if ch is not None and here else 0
        full = here and ngl == og.top
        mm.model.add_hint(og.x, here)
        if og.partial is not None and og.partial is not og.x:
            mm.model.add_hint(og.partial, here and not full)
        if og.layers is not None:
            mm.model.add_hint(og.layers, ngl if here and not full else 0)
        if here and not reps[k].model.on_demand:  # on-demand members count in their pool (below)
            used[gi] += reps[k].needs[problem.gpus[gi].node].vram(ngl)
    for (k, node), v in mm.c.items():
        ch = by_key.get(k)
        mm.model.add_hint(v, ch is not None and not ch.on_gpu and ch.node == node)
    for (k, node), spl in mm.sp.items():
        ch = by_key.get(k)
        blocks = dict(ch.split) if ch is not None and ch.split and ch.node == node else {}
        need = reps[k].splits[node]
        last = max(blocks, key=spl.gpus.index) if blocks else None
        mm.model.add_hint(spl.on, bool(blocks))
        cum = 0
        for j, gi in enumerate(spl.gpus):
            b = blocks.get(gi, 0)
            cum += b
            mm.model.add_hint(spl.used[j], gi in blocks)
            mm.model.add_hint(spl.blocks[j], b)
            mm.model.add_hint(spl.output[j], gi == last)
            mm.model.add_hint(spl.cum[j], cum)
            mm.model.add_hint(spl.prefix[j], need.prefix[cum])
        if blocks:
            units = need.devices([blocks[gi] for gi in spl.gpus if gi in blocks])
            for gi, u in zip([gi for gi in spl.gpus if gi in blocks], units, strict=True):
                used[gi] += u
    for pool in mm.pools:
        inside = [
            ch is not None and (ch.gpu == pool.gpu if pool.gpu is not None else not ch.on_gpu and ch.node == pool.node)
            for ch in (by_key.get(k) for k in pool.keys)
        ]
        mm.model.add_hint(pool.used, any(inside))
        for tk in (pool.vram, pool.ram):
            _hint_top_k(mm.model, tk, inside)
        if pool.gpu is not None:
            used[pool.gpu] += top_k_sum([v for v, i in zip(pool.vram.values, inside, strict=True) if i], pool.vram.k)
    for k, v in mm.placed.items():
        mm.model.add_hint(v, k in by_key)
    for k, v in mm.stays.items():
        ch, cur = by_key.get(k), problem.current[k]
        mm.model.add_hint(v, ch is not None and _same_place(problem, ch, cur) and ch.ngl == cur.gpu_layers)
    util = 0
    for gi, u in used.items():
        cap = units_down(problem.gpus[gi].capacity)
        if cap > 0:
            util = max(util, -(-UTIL_SCALE * u // cap))
    mm.model.add_hint(mm.util, min(util, UTIL_SCALE))


def _hint_top_k(model: cp_model.CpModel, tk: _TopK, inside: list[bool]) -> None:
    """Hint a pool's size variables: t the k-th largest member's need, s_i what exceeds it."""
    if tk.pool is None:
        return
    chosen = sorted((v for v, i in zip(tk.values, inside, strict=True) if i), reverse=True)
    t = chosen[tk.k - 1] if len(chosen) >= tk.k else 0
    model.add_hint(tk.pool, sum(chosen[: tk.k]))
    if tk.t is None:
        return
    model.add_hint(tk.t, t)
    for si, v, i in zip(tk.s, tk.values, inside, strict=True):
        model.add_hint(si, max(0, v - t) if i else 0)


def solve(problem: Problem, params: SolveParams, start: float | None = None) -> PlacementResult:
    """Solve a prepared problem: three lexicographic stages, greedy when CP-SAT finds nothing.

    All stages together keep to `params.time_limit` seconds from `start` (default: now),
    less a twentieth left for building the result; a stage that finishes early leaves its
    time to the next.
    """
    start = time.monotonic() if start is None else start
    baseline = greedy_assign(problem)
    if problem.current:
        # Start from the current placement where it still fits, unless first-fit does better.
        stable = greedy_assign(problem, keep_current=True)
        if choice_score(problem, stable) >= choice_score(problem, baseline):
            baseline = stable
    baseline = _with_fill(problem, baseline, params)
    if _pairs(problem) > LNS_MIN_PAIRS:
        return _solve_lns(problem, params, start, baseline)
    mm = _build(problem)
    w = placement_weight(problem)
    clock = _Clock(params, start)

    # Stage 1: priority-weighted placement.
    mm.model.maximize(mm.placement)
    base_placed = choice_placement(problem, baseline)
    pw = placed_weights(problem)
    somewhere = {k for k, _ in mm.x} | {k for k, _ in mm.c} | {k for k, _ in mm.sp}
    if base_placed >= sum(pw[k[0]] for k in somewhere):
        # The start places every replica that has anywhere to go: stage 1 has nothing to find.
        placed_best = placed_bound = base_placed
        chosen = baseline
        optimal = True
    else:
        _hint(mm, problem, baseline)
        s1 = clock.solver(STAGE_SHARES[0], len(mm.x))
        st1 = s1.solve(mm.model)
        clock.spent(s1)
        if st1 not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            # No solution in time (or the model is broken): fall back to the start (first-fit's, or better).
            return _result(problem, baseline, "FEASIBLE", "greedy")
        placed_best = round(s1.objective_value)
        placed_bound = round(s1.best_objective_bound)
        chosen = _extract(problem, mm, s1)
        optimal = st1 == cp_model.OPTIMAL
        if base_placed > placed_best:
            # CP-SAT's presolve may lose a complete hint (its symmetry reductions): the start is still a plan.
            placed_best, chosen = base_placed, baseline

    # Stage 2: keep stage 1's value; move as few running replicas as possible, then the most GPU layers
    # (of pinned models), then the fewest on-demand models in CPU pools (a GPU pool loads and answers faster):
    # one more layer or one fewer move outweighs every on-demand model's pool (scale: on-demand count + 1).
    mm.model.add(mm.placement >= placed_best)
    cpu_members = cp_model.LinearExpr.sum([v for p in mm.pools if p.gpu is None for v in p.members])
    scale = 1 + sum(len(p.members) for p in mm.pools)
    stage2 = scale * (mm.layers - w * mm.moves) - cpu_members
    mm.model.maximize(stage2)
    if choice_placement(problem, baseline) >= placed_best and _stage2_value(problem, baseline) > _stage2_value(
        problem, chosen
    ):
        # First-fit places as much and has more layers: start from it, so the plan is never worse than it.
        chosen = baseline

    def stage2_of(plan: list[Choice]) -> int:
        return scale * _stage2_value(problem, plan) - sum(reps[ch.key].model.on_demand and not ch.on_gpu for ch in plan)

    reps = {r.key: r for r in problem.replicas}
    start2 = stage2_of(chosen)
    top2 = scale * sum(
        (r.model.priority + 1) * r.n_layers for r in reps.values() if r.key in somewhere and not r.model.on_demand
    )
    layers_bound = w - 1
    if optimal and not problem.current and start2 >= top2:
        # Every replica placed, each pinned one with all its layers on GPUs: stage 2 has nothing to find.
        st2 = cp_model.OPTIMAL
        value2 = start2
        layers_bound = top2 // scale
    else:
        _hint(mm, problem, chosen)
        s2 = clock.solver(STAGE_SHARES[1], len(mm.x))
        st2 = s2.solve(mm.model)
        clock.spent(s2)
        if st2 in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            value2 = round(s2.objective_value)
            if value2 < start2:
                # The search lost its (complete) hint and found worse: keep the start.
                st2, value2 = cp_model.FEASIBLE, start2
            else:
                chosen = _extract(problem, mm, s2)
            optimal = optimal and st2 == cp_model.OPTIMAL
            if optimal and not problem.current:
                # scale · layers − (members in CPU pools, at most scale − 1) ≤ the proven bound.
                layers_bound = math.floor((s2.best_objective_bound + scale - 1) / scale + 1e-9)
    if st2 in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        # Stage 3: keep stage 2's value; balance headroom.
        mm.model.add(stage2 >= value2)
        _hint(mm, problem, chosen)
        # Fewest split replicas first (a split pays a compute buffer and overhead again on every GPU
        # it uses), then the balance.
        splits = cp_model.LinearExpr.sum([spl.on for spl in mm.sp.values()])
        mm.model.minimize((UTIL_SCALE + 1) * splits + mm.util)
        s3 = clock.solver(STAGE_SHARES[2], len(mm.x))
        # Symmetry reductions in presolve may lose the hint, which here is a plan of stage 2's value: without
        # it a perfect packing (triplets) is searched for again only to balance headroom.
        s3.parameters.symmetry_level = 0
        st3 = s3.solve(mm.model)
        if st3 in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            chosen = _extract(problem, mm, s3)
            optimal = optimal and st3 == cp_model.OPTIMAL
        else:
            optimal = False
    else:
        optimal = False
    # Proven: no plan places more (priority-weighted) than `placed_bound`, nor has more layers than
    # `layers_bound` (known only when stages 1 and 2 are optimal; else all layers of all replicas).
    bound = w * placed_bound + layers_bound
    return _result(problem, chosen, "OPTIMAL" if optimal else "FEASIBLE", "cp-sat", bound)


def _with_fill(problem: Problem, baseline: list[Choice], params: SolveParams) -> list[Choice]:
    """`baseline`, or first-fit after `solver.fill.exact_fill` where that scores strictly better (stages 1
    and 2's objectives, moves included). Tried only where `baseline` leaves a pinned replica that may run
    fully offloaded on one GPU anything less (not placed, partly offloaded, on the CPU). Its search has
    `FILL_STEPS` per 10 s of the time limit."""
    by_key = {ch.key: ch for ch in baseline}
    short = any(
        ((ch := by_key.get(r.key)) is None or not ch.on_gpu or ch.ngl < r.n_layers) and full_gpus(problem, r)
        for r in problem.replicas
    )
    if not short:
        return baseline
    fill = exact_fill(problem, round(FILL_STEPS * params.time_limit / 10))
    best, value = baseline, _plan_value(problem, baseline)
    # With a current placement, also with the replicas that still fit where they run kept there first.
    for keep in (True, False) if problem.current else (False,):
        plan = greedy_assign(problem, keep_current=keep, preset=fill)
        if _plan_value(problem, plan) > value:
            best, value = plan, _plan_value(problem, plan)
    return best


# --------------------------------------------------------------------------- large clusters


LNS_MIN_PAIRS = 1500
"""Above this many (replica, GPU) pairs the whole model is not built: CP-SAT re-optimises a few nodes at a time.
(On the bench's 100-model, 30-GPU clusters, ~2000 pairs, that found as good or better plans than the
whole model in the same budget: on one, 76 % more priority-weighted GPU layers.)"""
LNS_MAX_PAIRS = 300
"""The most (replica, GPU) pairs one neighbourhood's model has. (500 x 100 bench clusters, 3 seeds, 10 s:
+0.02/0.64/0.88 % over greedy with 1200, +0.09/1.22/2.97 with 600, +0.11/1.42/3.33 with 300.)"""
LNS_ROUND_LIMIT = 0.25
"""Deterministic seconds at most for one neighbourhood."""


def _pairs(problem: Problem) -> int:
    return sum(len(v) for v in problem.gpu_cands.values())


def _solve_lns(problem: Problem, params: SolveParams, start: float, plan: list[Choice]) -> PlacementResult:
    """Large-neighbourhood search from first-fit's plan, for clusters too large for one model in time.

    Building and loading one CP-SAT model of a 500-replica, 100-GPU cluster (39k pairs, 117k
    variables) takes longer than a 10 s budget on a small machine before the search starts. Instead:
    each round frees the replicas on a few nodes (chosen by a generator seeded with `params.seed`),
    together with every replica not placed yet that could run there, and CP-SAT solves that
    neighbourhood with everything else fixed, maximising placement, then GPU layers less moves (one
    weighted objective: the neighbourhood is small). A round never makes the plan worse (it starts
    from the plan as a complete hint). Rounds run until the deterministic budget is spent, so the
    same input and parameters give the same plan. The bound is a relaxation's: per node, one
    knapsack of the replicas' least VRAM, least RAM and least VRAM + RAM over all their options there.
    Headroom is not balanced (stage 3).
    """
    rng = random.Random(params.seed)
    w = placement_weight(problem)
    reps = {r.key: r for r in problem.replicas if r.key not in problem.blocked}
    nodes = sorted({g.node for g in problem.gpus} | {n for cs in problem.cpu_cands.values() for n in cs})
    cands_on: dict[ReplicaKey, dict[str, int]] = {}
    for k in reps:
        per: dict[str, int] = defaultdict(int)
        for gi in problem.gpu_cands.get(k, []):
            per[problem.gpus[gi].node] += 1
        for n in problem.cpu_cands.get(k, []):
            per[n] += 1
        for n in problem.split_cands.get(k, {}):
            per[n] += 1
        cands_on[k] = per
    budget = params.time_limit * STAGE_SHARES[1]
    wall_end = start + WALL_CAP * params.time_limit
    bound_solver = _solver(params, 0.05 * params.time_limit, 0, max(0.05, wall_end - time.monotonic()))
    placed_bound = _placement_bound(problem, bound_solver)
    used = bound_solver.deterministic_time
    order: list[str] = []
    value = _plan_value(problem, plan)
    # Every replica that has anywhere to go placed, each pinned one with all its layers and none moved: no
    # neighbourhood can do better.
    somewhere = [r for k, r in reps.items() if cands_on[k]]
    pw = placed_weights(problem)
    best = (
        sum(pw[r.model.name] for r in somewhere),
        sum((r.model.priority + 1) * r.n_layers for r in somewhere if not r.model.on_demand),
    )
    may_improve = True
    while used < budget and time.monotonic() < wall_end and value < best:
        if not order:
            if not may_improve:
                break  # a whole pass over the nodes, each proven optimal, changed nothing: a local optimum
            may_improve = False
            order = nodes[:]
            rng.shuffle(order)
        by_key = {ch.key: ch for ch in plan}
        free: set[ReplicaKey] = set()
        chosen_nodes: set[str] = set()
        unplaced = [k for k in reps if k not in by_key]
        while order:
            n = order[-1]
            grow = {ch.key for ch in plan if ch.node == n} | {k for k in unplaced if n in cands_on[k]}
            trial_nodes = chosen_nodes | {n}
            pairs = sum(v for k in free | grow for nn, v in cands_on[k].items() if nn in trial_nodes)
            if chosen_nodes and pairs > LNS_MAX_PAIRS:
                break
            order.pop()
            chosen_nodes.add(n)
            free |= grow
        sub, back = _neighbourhood(problem, chosen_nodes, free)
        fixed = [ch for ch in plan if ch.key not in free]
        mm = _build(sub)
        # One more placed replica outweighs all layers and every move of the neighbourhood.
        placed_w = w * (len(sub.current) + 1)
        mm.model.maximize(placed_w * mm.placement + mm.layers - w * mm.moves)
        _hint(mm, sub, [_remap(ch, {gi: j for j, gi in enumerate(back)}) for ch in plan if ch.key in free])
        wall_left = wall_end - time.monotonic()
        s = _solver(params, min(LNS_ROUND_LIMIT, budget - used), len(mm.x), max(0.05, wall_left))
        st = s.solve(mm.model)
        used += max(s.deterministic_time, 0.005)
        if st != cp_model.OPTIMAL:
            may_improve = True  # not proven: this neighbourhood may still improve on a later pass
        if st in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            new = fixed + [_remap(ch, dict(enumerate(back))) for ch in _extract(sub, mm, s)]
            new_value = _plan_value(problem, new)
            if new_value > value:
                plan, value, may_improve = new, new_value, True
    return _result(problem, plan, "FEASIBLE", "cp-sat-lns", w * placed_bound + w - 1)


def _plan_value(problem: Problem, plan: list[Choice]) -> tuple[int, int]:
    """Stages 1 and 2's objectives of a plan, compared lexicographically."""
    return choice_placement(problem, plan), _stage2_value(problem, plan)


def _neighbourhood(problem: Problem, nodes: set[str], free: set[ReplicaKey]) -> tuple[Problem, list[int]]:
    """The sub-problem of the replicas `free` on the GPUs and CPUs of `nodes` (and sub → problem GPU indices)."""
    back = [gi for gi, g in enumerate(problem.gpus) if g.node in nodes]
    to_sub = {gi: j for j, gi in enumerate(back)}
    keys = sorted(free)
    sub = Problem(
        spec=problem.spec,
        replicas=[r for r in problem.replicas if r.key in free],
        gpus=[problem.gpus[gi] for gi in back],
        node_ram={n: problem.node_ram[n] for n in nodes},
        gpu_cands={k: [to_sub[gi] for gi in problem.gpu_cands.get(k, []) if gi in to_sub] for k in keys},
        cpu_cands={k: [n for n in problem.cpu_cands.get(k, []) if n in nodes] for k in keys},
        current={k: c for k, c in problem.current.items() if k in free},
        port_slots={n: v for n, v in problem.port_slots.items() if n in nodes},
        split_cands={
            k: {n: [to_sub[gi] for gi in gis] for n, gis in problem.split_cands[k].items() if n in nodes}
            for k in keys
            if k in problem.split_cands
        },
    )
    return sub, back


def _remap(ch: Choice, gpu: Mapping[int, int]) -> Choice:
    """A choice with its GPU indices mapped (between a problem and a neighbourhood of it)."""
    return Choice(
        ch.key,
        ch.node,
        None if ch.gpu is None else gpu[ch.gpu],
        ch.ngl,
        tuple((gpu[gi], b) for gi, b in ch.split),
    )


def _placement_bound(problem: Problem, s: cp_model.CpSolver) -> int:
    """A proven upper bound on priority-weighted placement, from a per-node knapsack relaxation.

    A replica on node n uses at least its least VRAM, its least RAM and its least VRAM + RAM over
    every option it has there (a GPU fully or partly offloaded, a split, the CPU); per node those
    least amounts of the replicas on it fit in the node's VRAM, RAM and both together.
    """
    m = cp_model.CpModel()
    cap = [units_down(g.capacity) for g in problem.gpus]
    ram = {n: units_down(b) for n, b in problem.node_ram.items()}
    node_vram: dict[str, int] = defaultdict(int)
    for gi, g in enumerate(problem.gpus):
        node_vram[g.node] += cap[gi]
    use: dict[tuple[str, int], list[Expr]] = defaultdict(list)
    pw = placed_weights(problem)
    per_model_node: dict[tuple[str, str], list[cp_model.IntVar]] = defaultdict(list)
    objective: list[Expr] = []
    for r in problem.replicas:
        k = r.key
        if k in problem.blocked:
            continue
        lo, hi = r.ngl_range()
        options: dict[str, list[tuple[int, int]]] = defaultdict(list)
        # An on-demand member may share its pool's room with larger members: it is counted as needing none.
        od = 0 if r.model.on_demand else 1
        for gi in problem.gpu_cands.get(k, []):
            node = problem.gpus[gi].node
            need = r.needs[node]
            full_ok, plo, phi = _regimes(need, lo, hi, cap[gi], ram[node])
            if full_ok:
                options[node].append((od * need.v_full, od * need.r_full))
            for ngl in (plo, phi) if plo <= phi else ():
                options[node].append((need.vram(ngl), need.ram(ngl)))
        for node in problem.split_cands.get(k, {}):
            options[node].append((0, r.splits[node].ram))
        for node in problem.cpu_cands.get(k, []):
            options[node].append((0, od * r.needs[node].r0))
        ys = []
        for node, opts in options.items():
            y = m.new_bool_var(f"y[{k[0]}#{k[1]},{node}]")
            ys.append(y)
            per_model_node[k[0], node].append(y)
            use[node, 0].append(min(v for v, _ in opts) * y)
            use[node, 1].append(min(b for _, b in opts) * y)
            use[node, 2].append(min(v + b for v, b in opts) * y)
        if ys:
            m.add(cp_model.LinearExpr.sum(ys) <= 1)
            objective.append(pw[r.model.name] * cp_model.LinearExpr.sum(ys))
    for (node, what), terms in use.items():
        limit = (node_vram[node], ram[node], node_vram[node] + ram[node])[what]
        m.add(cp_model.LinearExpr.sum(terms) <= limit)
    for lits in per_model_node.values():
        if len(lits) > 1:
            m.add(cp_model.LinearExpr.sum(lits) <= 1)
    m.maximize(cp_model.LinearExpr.sum(objective))
    st = s.solve(m)
    if st in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return math.floor(s.best_objective_bound + 1e-6)
    return sum(pw[r.model.name] for r in problem.replicas if r.key not in problem.blocked)


STAGE_SHARES = (0.45, 0.85, 0.95)
"""Where each stage must end, as a share of the time limit (a stage that ends early leaves the rest)."""


class _Clock:
    """The time budget across stages: deterministic time (work done), or the wall clock."""

    def __init__(self, params: SolveParams, start: float) -> None:
        self.params = params
        self.start = start
        self.used = 0.0
        """Deterministic time spent by the stages so far."""

    def solver(self, share: float, pairs: int) -> cp_model.CpSolver:
        end = self.params.time_limit * share
        elapsed = time.monotonic() - self.start
        if self.params.deterministic:
            # The wall-clock cap is shared by the stages too: WALL_CAP × the limit in all.
            return _solver(self.params, end - self.used, pairs, WALL_CAP * end - elapsed)
        return _solver(self.params, end - elapsed, pairs)

    def spent(self, s: cp_model.CpSolver) -> None:
        self.used += s.deterministic_time


def choice_placement(problem: Problem, chosen: list[Choice]) -> int:
    """Stage 1's objective (priority-weighted placed replicas, pinned first) of choices."""
    pw = placed_weights(problem)
    return sum(pw[ch.key[0]] for ch in chosen)


def _stage2_value(problem: Problem, chosen: list[Choice]) -> int:
    """Stage 2's objective of choices: priority-weighted GPU layers, less a placement weight per move."""
    pinned = {m.name: m.priority + 1 for m in problem.spec.models if not m.on_demand}
    layers = sum(pinned.get(ch.key[0], 0) * ch.ngl for ch in chosen)
    by_key = {ch.key: ch for ch in chosen}
    placeable = {r.key for r in problem.replicas if r.key not in problem.blocked}
    moves = 0
    for k, cur in problem.current.items():
        if k not in placeable:
            continue
        ch = by_key.get(k)
        same = ch is not None and _same_place(problem, ch, cur)
        if not (same and ch is not None and (cur.gpu_layers is None or ch.ngl == cur.gpu_layers)):
            moves += 1
    return layers - placement_weight(problem) * moves


def _same_place(problem: Problem, ch: Choice, cur: CurrentAssignment) -> bool:
    """Whether a choice keeps a replica on its current node and exactly its current GPUs."""
    return cur.same_place(ch.node, tuple(problem.gpus[gi].index for gi in ch.gpu_slots()))


def choice_score(problem: Problem, chosen: list[Choice]) -> int:
    """`score` of choices before they become assignments."""
    w = placement_weight(problem)
    pw = placed_weights(problem)
    lw = {m.name: 0 if m.on_demand else m.priority + 1 for m in problem.spec.models}
    return sum(pw[ch.key[0]] * w + lw[ch.key[0]] * ch.ngl for ch in chosen)


def _extract(problem: Problem, mm: _Model, s: cp_model.CpSolver) -> list[Choice]:
    out: list[Choice] = []
    for (k, gi), og in mm.x.items():
        if s.boolean_value(og.x):
            out.append(Choice(k, problem.gpus[gi].node, gi, int(s.value(mm.ngl[k]))))
    for (k, n), v in mm.c.items():
        if s.boolean_value(v):
            out.append(Choice(k, n, None, 0))
    for (k, n), spl in mm.sp.items():
        if s.boolean_value(spl.on):
            split = tuple(
                (gi, int(s.value(b)))
                for gi, u, b in zip(spl.gpus, spl.used, spl.blocks, strict=True)
                if s.boolean_value(u)
            )
            out.append(Choice(k, n, None, spl.top, split))
    return out


def _result(
    problem: Problem, chosen: list[Choice], status: str, solver: str, bound: int | None = None
) -> PlacementResult:
    reps = {r.key: r for r in problem.replicas}
    used: dict[int, int] = defaultdict(int)
    assignments: list[Assignment] = []
    for ch in sorted(chosen, key=lambda c: c.key):
        r = reps[ch.key]
        curve = r.curves[ch.node]
        vram: dict[int, int] = {}
        per_gpu: dict[int, int] = {}
        ram = ram_at(curve, ch.ngl)
        if ch.split:
            sc = r.profile.node_splits[ch.node]
            blocks = [b for _, b in ch.split]
            for (gi, b), nbytes in zip(ch.split, sc.devices(blocks), strict=True):
                index = problem.gpus[gi].index
                vram[index] = nbytes
                used[gi] += nbytes
                per_gpu[index] = b
            per_gpu[problem.gpus[ch.split[-1][0]].index] += 1  # the output layer
            ram = sc.ram_bytes
        elif ch.gpu is not None:
            b = vram_at(curve, ch.ngl)
            vram[problem.gpus[ch.gpu].index] = b
            if not r.model.on_demand:
                used[ch.gpu] += b  # an on-demand member counts in its pool's size
        assignments.append(
            Assignment(
                model=ch.key[0],
                replica=ch.key[1],
                node=ch.node,
                gpus=tuple(sorted(vram)),
                gpu_layers=ch.ngl,
                layers=r.n_layers,
                vram_bytes=vram,
                ram_bytes=ram,
                context=r.model.context,
                layers_per_gpu=per_gpu,
                on_demand=r.model.on_demand,
            )
        )
    pools = pools_of(problem, assignments)
    pool_at: dict[tuple[str, int], int] = {(p.node, p.gpu): p.size_bytes for p in pools if p.gpu is not None}
    gpu_use = tuple(
        GpuUse(g.node, g.index, g.name, g.capacity, used.get(gi, 0) + pool_at.get(g.key, 0), pool_at.get(g.key, 0))
        for gi, g in enumerate(problem.gpus)
    )
    moves = 0
    where = {(a.model, a.replica): (a.node, a.gpus) for a in assignments}
    for k, cur in problem.current.items():
        # A replica stays only on the same node and exactly the same GPUs.
        if where.get(k) != (cur.node, tuple(cur.gpus)):
            moves += 1
    unplaced, notes = explain(problem, assignments, gpu_use, pools)
    return PlacementResult(
        status=status,
        assignments=tuple(assignments),
        unplaced=unplaced,
        gpus=gpu_use,
        objective=score(problem, assignments),
        moves=moves,
        solver=solver,
        notes=notes,
        bound=bound,
        pools=pools,
    )


def greedy_place(
    spec: ClusterSpec,
    profiles: Mapping[str, Profile],
    current: Mapping[ReplicaKey, CurrentAssignment] | None = None,
    foreign_vram: Mapping[GpuKey, int] | None = None,
) -> PlacementResult:
    """First-fit decreasing (the benchmark's baseline), as a full result."""
    problem = build_problem(spec, profiles, current, foreign_vram)
    return _result(problem, greedy_assign(problem), "FEASIBLE", "greedy")
