"""Placement: which node, which GPU and how many GPU layers for every model replica (CP-SAT).

`place()` is pure: the spec, one memory profile per model (`solver.profiles`),
optionally the current placement (for stability) and the VRAM that processes
homelab doesn't manage hold on each GPU. It builds one CP-SAT model and solves
it in two stages with the earlier objective fixed:

1. placed replicas weighted by priority, then GPU layers weighted by priority
   (`solver.problem.score`);
2. replicas moved away from their current node/GPU, then the highest GPU
   utilisation (headroom balanced).

Memory is counted in MiB inside the model, every need rounded up and every
capacity rounded down, so a plan the model accepts fits in bytes too. A
replica with 0 GPU layers runs without a GPU (RAM only); it may only go to a
node with no GPU or, when nothing better fits, to a GPU node's CPU.

Multi-GPU split (`placement.split`) is not modelled yet: a replica gets one
GPU, chosen among `placement.gpus` when those are pinned.

Same input, same parameters → same plan: the search uses a fixed seed and, with
several workers, CP-SAT's deterministic interleaved search.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from ortools.sat.python import cp_model

from solver.explain import explain
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
    build_problem,
    placement_weight,
    ram_at,
    score,
    units_down,
    vram_at,
)
from solver.profiles import Profile
from specs.enums import Runtime
from specs.model import ClusterSpec

Expr = cp_model.LinearExpr
UTIL_SCALE = 1000
"""GPU utilisation is measured in permille in the balance objective."""


@dataclass(frozen=True)
class SolveParams:
    time_limit: float = 10.0
    """Seconds per stage."""
    workers: int = 2
    seed: int = 0


def place(
    spec: ClusterSpec,
    profiles: Mapping[str, Profile],
    current: Mapping[ReplicaKey, CurrentAssignment] | None = None,
    foreign_vram: Mapping[GpuKey, int] | None = None,
    params: SolveParams | None = None,
) -> PlacementResult:
    """The best placement of `spec` (see the module docstring)."""
    params = params or SolveParams()
    problem = build_problem(spec, profiles, current, foreign_vram)
    return solve(problem, params)


# --------------------------------------------------------------------------- model


LayerVars = tuple[ReplicaKey, int, list[int], cp_model.IntVar, cp_model.IntVar, cp_model.IntVar]
"""(replica, L+1, GPUs of the class, full, partial, partial ngl)."""


@dataclass
class _Model:
    model: cp_model.CpModel
    x: dict[tuple[ReplicaKey, int], cp_model.IntVar]
    """x[r, g]: replica r runs on GPU g (index into problem.gpus)."""
    c: dict[tuple[ReplicaKey, str], cp_model.IntVar]
    """c[r, n]: replica r runs on node n's CPU only."""
    ngl: dict[ReplicaKey, Expr]
    placed: dict[ReplicaKey, cp_model.IntVar]
    stage1: Expr
    moves: Expr
    util: cp_model.IntVar
    layer_vars: list[LayerVars]


def _build(problem: Problem) -> _Model:
    # ----------------------------------------------------------------- data
    m = cp_model.CpModel()
    gpus = problem.gpus
    cap = [units_down(g.capacity) for g in gpus]
    node_ram = {n: units_down(b) for n, b in problem.node_ram.items()}
    reps = [r for r in problem.replicas if r.key not in problem.blocked]

    # ----------------------------------------------------------------- variables
    x: dict[tuple[ReplicaKey, int], cp_model.IntVar] = {}
    c: dict[tuple[ReplicaKey, str], cp_model.IntVar] = {}
    placed: dict[ReplicaKey, cp_model.IntVar] = {}
    ngl: dict[ReplicaKey, Expr] = {}
    vram_use: dict[int, list[Expr]] = defaultdict(list)
    ram_use: dict[str, list[Expr]] = defaultdict(list)
    on_node: dict[tuple[ReplicaKey, str], list[cp_model.IntVar]] = defaultdict(list)
    layer_vars: list[LayerVars] = []
    for r in reps:
        k = r.key
        tag = f"{k[0]}#{k[1]}"
        for gi in problem.gpu_cands[k]:
            x[k, gi] = m.new_bool_var(f"x[{tag},{gpus[gi].node}:{gpus[gi].index}]")
            on_node[k, gpus[gi].node].append(x[k, gi])
        for n in problem.cpu_cands[k]:
            c[k, n] = m.new_bool_var(f"c[{tag},{n}]")
            on_node[k, n].append(c[k, n])
        placed[k] = m.new_bool_var(f"placed[{tag}]")

    # ----------------------------------------------------------------- constraints
    for r in reps:
        k = r.key
        tag = f"{k[0]}#{k[1]}"
        gx = [x[k, gi] for gi in problem.gpu_cands[k]]
        cx = [c[k, n] for n in problem.cpu_cands[k]]
        # A replica is placed on at most one GPU or one node's CPU.
        m.add(sum(gx) + sum(cx) == placed[k])
        lo, hi = r.ngl_range()
        # A CPU-only replica holds its whole RAM need on its node.
        for n in problem.cpu_cands[k]:
            ram_use[n].append(r.needs[n].r0 * c[k, n])
        # GPU candidates are grouped by identical memory needs (nodes whose curves agree).
        classes: dict[LinearNeed, list[int]] = defaultdict(list)
        for gi in problem.gpu_cands[k]:
            classes[r.needs[gpus[gi].node]].append(gi)
        parts: list[Expr] = []
        for ci, (need, members) in enumerate(sorted(classes.items(), key=lambda kv: kv[1])):
            sel = cp_model.LinearExpr.sum([x[k, gi] for gi in members])
            if lo == hi or need.plo > need.top - 1:
                # Only full offload: all L+1 layers on the GPU.
                v_k: Expr = cp_model.LinearExpr.term(sel, need.v_full)
                m_k: Expr = cp_model.LinearExpr.term(sel, need.r_full)
                parts.append(cp_model.LinearExpr.term(sel, need.top))
            else:
                f = m.new_bool_var(f"full[{tag},{ci}]")
                p = m.new_bool_var(f"partial[{tag},{ci}]")
                nv = m.new_int_var(0, need.top - 1, f"ngl[{tag},{ci}]")
                # On this class's GPUs the replica runs fully or partially offloaded.
                m.add(f + p == sel)
                # Partial offload keeps plo … L layers on the GPU; none when not partial.
                m.add(nv >= need.plo * p)
                m.add(nv <= (need.top - 1) * p)
                layer_vars.append((k, need.top, members, f, p, nv))
                v_k = cp_model.LinearExpr.weighted_sum([f, p, nv], [need.v_full, need.a_v, need.b_v])
                m_k = cp_model.LinearExpr.weighted_sum([f, p, nv], [need.r_full, need.a_r, need.b_r])
                parts.append(cp_model.LinearExpr.weighted_sum([f, nv], [need.top, 1]))
            ub_v = need.v_full if lo == hi else max(need.v_full, need.vram(need.top - 1), need.vram(need.plo))
            ub_r = max(need.r_full, need.ram(need.plo), need.ram(need.top - 1)) if lo < hi else need.r_full
            # The class's VRAM lands on exactly the chosen GPU.
            ys = []
            for gi in members:
                ub = min(cap[gi], ub_v)
                y = m.new_int_var(0, ub, f"y[{tag},{gpus[gi].node}:{gpus[gi].index}]")
                m.add(y <= ub * x[k, gi])
                vram_use[gi].append(y)
                ys.append(y)
            m.add(cp_model.LinearExpr.sum(ys) == v_k)
            # The class's RAM (what stays on the CPU) lands on the chosen GPU's node.
            by_node: dict[str, list[int]] = defaultdict(list)
            for gi in members:
                by_node[gpus[gi].node].append(gi)
            zs = []
            for n, gis in sorted(by_node.items()):
                ub = min(node_ram[n], max(ub_r, 0))
                z = m.new_int_var(0, ub, f"z[{tag},{n},{ci}]")
                m.add(z <= ub * cp_model.LinearExpr.sum([x[k, gi] for gi in gis]))
                ram_use[n].append(z)
                zs.append(z)
            m.add(cp_model.LinearExpr.sum(zs) == m_k)
        ngl[k] = cp_model.LinearExpr.sum(parts)

    # Per-GPU VRAM: the placed replicas' GPU bytes fit in capacity − reserve − foreign use.
    for gi, terms in vram_use.items():
        m.add(sum(terms) <= cap[gi])
    # Per-node RAM: CPU-side layers, KV and buffers fit in ram − ram_reserve.
    for n, terms in ram_use.items():
        m.add(sum(terms) <= node_ram[n])
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
        if model.runtime is Runtime.LLAMACPP:
            llama[n].extend(lits)
            if model.port is not None:
                fixed_port[n, model.port].extend(lits)
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
    w = placement_weight(problem)
    stage1 = cp_model.LinearExpr.sum(
        [(r.model.priority + 1) * w * placed[r.key] for r in reps] + [(r.model.priority + 1) * ngl[r.key] for r in reps]
    )
    moved: list[Expr] = []
    for k, cur in problem.current.items():
        if k not in placed:
            continue
        stay: list[cp_model.IntVar] = []
        if cur.gpus:
            stay = [x[k, gi] for gi in problem.gpu_cands[k] if gpus[gi].key == (cur.node, cur.gpus[0])]
        elif (k, cur.node) in c:
            stay = [c[k, cur.node]]
        moved.append(1 - cp_model.LinearExpr.sum(stay))
    util = m.new_int_var(0, UTIL_SCALE, "util")
    # The balance objective: every GPU's utilisation is at most `util` permille.
    for gi, terms in vram_use.items():
        if cap[gi] > 0:
            m.add(UTIL_SCALE * sum(terms) <= cap[gi] * util)
    return _Model(m, x, c, ngl, placed, stage1, cp_model.LinearExpr.sum(moved), util, layer_vars)


# --------------------------------------------------------------------------- solve


def _solver(params: SolveParams, time_limit: float) -> cp_model.CpSolver:
    s = cp_model.CpSolver()
    s.parameters.max_time_in_seconds = max(0.05, time_limit)
    s.parameters.num_workers = params.workers
    s.parameters.random_seed = params.seed
    if params.workers > 1:
        s.parameters.interleave_search = True
    return s


def _hint(mm: _Model, chosen: list[Choice]) -> None:
    """Start the search from a known plan (greedy's, or stage 1's)."""
    mm.model.clear_hints()  # type: ignore[no-untyped-call]
    by_key = {ch.key: ch for ch in chosen}
    for (k, gi), v in mm.x.items():
        ch = by_key.get(k)
        mm.model.add_hint(v, ch is not None and ch.gpu == gi)
    for (k, n), v in mm.c.items():
        ch = by_key.get(k)
        mm.model.add_hint(v, ch is not None and ch.gpu is None and ch.node == n)
    for k, v in mm.placed.items():
        mm.model.add_hint(v, k in by_key)
    for k, top, members, f, p, nv in mm.layer_vars:
        ch = by_key.get(k)
        here = ch is not None and ch.gpu in members
        ngl = ch.ngl if ch is not None and here else 0
        mm.model.add_hint(f, here and ngl == top)
        mm.model.add_hint(p, here and ngl < top)
        mm.model.add_hint(nv, ngl if here and ngl < top else 0)


def solve(problem: Problem, params: SolveParams) -> PlacementResult:
    """Solve a prepared problem: two lexicographic stages, greedy when CP-SAT finds nothing."""
    start = time.monotonic()
    mm = _build(problem)
    # Stage 1: priority-weighted placement, then priority-weighted GPU layers.
    mm.model.maximize(mm.stage1)
    baseline = greedy_assign(problem)
    _hint(mm, baseline)
    s1 = _solver(params, params.time_limit)
    st1 = s1.solve(mm.model)
    if st1 not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        # No solution in time (or the model is broken): fall back to first-fit decreasing.
        return _result(problem, baseline, "FEASIBLE", "greedy")
    best = round(s1.objective_value)
    chosen = _extract(problem, mm, s1)
    status = "OPTIMAL" if st1 == cp_model.OPTIMAL else "FEASIBLE"

    # Stage 2: keep stage 1's value; move as few running replicas as possible, then balance.
    mm.model.add(mm.stage1 >= best)
    _hint(mm, chosen)
    moves_weight = UTIL_SCALE + 1
    mm.model.minimize(cp_model.LinearExpr.weighted_sum([mm.moves, mm.util], [moves_weight, 1]))
    left = params.time_limit - (time.monotonic() - start)
    s2 = _solver(params, max(left, params.time_limit / 4))
    st2 = s2.solve(mm.model)
    if st2 in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        chosen = _extract(problem, mm, s2)
        if st2 != cp_model.OPTIMAL:
            status = "FEASIBLE"
    else:
        status = "FEASIBLE"
    return _result(problem, chosen, status, "cp-sat")


def _extract(problem: Problem, mm: _Model, s: cp_model.CpSolver) -> list[Choice]:
    out: list[Choice] = []
    for (k, gi), v in mm.x.items():
        if s.boolean_value(v):
            out.append(Choice(k, problem.gpus[gi].node, gi, int(s.value(mm.ngl[k]))))
    for (k, n), v in mm.c.items():
        if s.boolean_value(v):
            out.append(Choice(k, n, None, 0))
    return out


def _result(problem: Problem, chosen: list[Choice], status: str, solver: str) -> PlacementResult:
    reps = {r.key: r for r in problem.replicas}
    used: dict[int, int] = defaultdict(int)
    assignments: list[Assignment] = []
    for ch in sorted(chosen, key=lambda c: c.key):
        r = reps[ch.key]
        curve = r.curves[ch.node]
        vram: dict[int, int] = {}
        if ch.gpu is not None:
            b = vram_at(curve, ch.ngl)
            vram[problem.gpus[ch.gpu].index] = b
            used[ch.gpu] += b
        assignments.append(
            Assignment(
                model=ch.key[0],
                replica=ch.key[1],
                node=ch.node,
                gpus=tuple(sorted(vram)),
                gpu_layers=ch.ngl,
                layers=r.n_layers,
                vram_bytes=vram,
                ram_bytes=ram_at(curve, ch.ngl),
                context=r.model.context,
            )
        )
    gpu_use = tuple(GpuUse(g.node, g.index, g.name, g.capacity, used.get(gi, 0)) for gi, g in enumerate(problem.gpus))
    moves = 0
    where = {(a.model, a.replica): (a.node, a.gpus[:1]) for a in assignments}
    for k, cur in problem.current.items():
        if where.get(k) != (cur.node, cur.gpus[:1]):
            moves += 1
    unplaced, notes = explain(problem, assignments, gpu_use)
    return PlacementResult(
        status=status,
        assignments=tuple(assignments),
        unplaced=unplaced,
        gpus=gpu_use,
        objective=score(problem, assignments),
        moves=moves,
        solver=solver,
        notes=notes,
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
