"""Placement solver at scale: CP-SAT against first-fit decreasing on random clusters.

    python bench/solver.py [--seeds 3] [--time-limit 10] [--workers 1] [--triplets-only]

Per size: median and max solve time, statuses (`/lns`: a cluster above
solver.place.LNS_MIN_PAIRS pairs, solved a few nodes at a time; `/greedy`: CP-SAT
found nothing in time), CP-SAT's objective, greedy's, the
gain over greedy (in % of greedy's objective; negative would be a bug) and
CP-SAT's optimality gap (its proven bound minus its objective, in % of the
objective; 0 when OPTIMAL), and `layers±`: the median change in priority-weighted GPU
layers against greedy's plan (the objective's second part, hidden in it by placement's
weight; it may fall where more replicas are placed). Then tight instances (total VRAM demand 90–110 % of
the VRAM, half the models without CPU offload, small RAM): per size, on how many
seeds CP-SAT beats greedy strictly. Then Falkenauer-style triplets (3K full-offload models, each
between 1/4 and 1/2 of a GPU, filling K identical GPUs exactly; tests.support.clusters.triplet_spec):
per K, models left out by CP-SAT and by greedy (the target: none by CP-SAT for K <= 20).
Then stability: in a placed 50-model cluster, change one model's context and count how many other replicas move.
Then swap pools (issue 17; tests.support.clusters.pool_spec): a quarter of the models pinned, the rest
on-demand with 2–3× the VRAM between them: per size, the solve time with pools beside the solve of the
pinned models alone, how many of each were placed (the least over the seeds), how many on-demand models went
to CPU pools, the fullest GPU in any allowed combination of loaded members (pinned + pool, in % of
capacity), and how many models would run fully on a GPU were every model pinned (the rest partly or wholly on the CPU,
or left out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from solver.place import SolveParams, greedy_place, place
from solver.problem import CurrentAssignment, PlacementResult
from solver.profiles import profiles_for
from specs.model import ClusterSpec
from tests.support.clusters import pool_spec, random_spec, triplet_spec

SIZES = ((10, 2, 2), (50, 10, 5), (100, 30, 10), (200, 50, 15), (500, 100, 30))
"""(models, GPUs, nodes)."""
TIGHT_SIZES = ((10, 2, 2), (20, 4, 2), (50, 10, 5), (100, 30, 10))
TRIPLET_KS = (5, 10, 20, 40)
POOL_SIZES = ((50, 2, 2), (125, 5, 3), (250, 10, 5), (500, 20, 10))
POOL_DEMANDS = (2.0, 3.0)


def run_triplets(k: int, seeds: int, params: SolveParams) -> str:
    """CP-SAT and greedy on `seeds` triplet instances with k GPUs: models left out, statuses, time."""
    left: list[int] = []
    greedy_left: list[int] = []
    times: list[float] = []
    statuses: list[str] = []
    for seed in range(seeds):
        spec = triplet_spec(k, seed)
        profiles = profiles_for(spec)
        t = time.perf_counter()
        res = place(spec, profiles, params=params)
        times.append(time.perf_counter() - t)
        statuses.append(res.status + {"greedy": "/greedy", "cp-sat-lns": "/lns"}.get(res.solver, ""))
        left.append(len(res.unplaced))
        greedy_left.append(len(greedy_place(spec, profiles).unplaced))
    counts = ",".join(f"{statuses.count(x)} {x}" for x in sorted(set(statuses)))
    perfect = sum(n == 0 for n in left)
    return (
        f"{k:>4} {3 * k:>6} {statistics.median(times):>9.2f} {max(times):>7.2f}  {counts:<22}"
        f" {max(left):>10} {perfect:>4}/{seeds:<4} {statistics.median(greedy_left):>12.0f} {max(greedy_left):>10}"
    )


TRIPLET_HEADER = (
    f"{'K':>4} {'models':>6} {'median s':>9} {'max s':>7}  {'status':<22}"
    f" {'max left':>10} {'perfect':>9} {'greedy left':>12} {'max greedy':>10}"
)


def run_size(n_models: int, n_gpus: int, n_nodes: int, seeds: int, params: SolveParams, tight: bool = False) -> str:
    times: list[float] = []
    statuses: list[str] = []
    objs: list[int] = []
    greedys: list[int] = []
    opt_gaps: list[float] = []
    layer_gains: list[float] = []
    for seed in range(seeds):
        spec = random_spec(n_models, n_gpus, n_nodes, seed, tight)
        profiles = profiles_for(spec)
        t = time.perf_counter()
        res = place(spec, profiles, params=params)
        times.append(time.perf_counter() - t)
        statuses.append(res.status + {"greedy": "/greedy", "cp-sat-lns": "/lns"}.get(res.solver, ""))
        objs.append(res.objective)
        greedy = greedy_place(spec, profiles)
        greedys.append(greedy.objective)
        layers, greedy_layers = _layers(spec, res), _layers(spec, greedy)
        layer_gains.append(100.0 * (layers - greedy_layers) / greedy_layers if greedy_layers else 0.0)
        opt_gaps.append(res.gap if res.gap is not None else float("nan"))
    gains = [100.0 * (o - g) / g if g else 0.0 for o, g in zip(objs, greedys, strict=True)]
    better = sum(o > g for o, g in zip(objs, greedys, strict=True))
    counts = ",".join(f"{statuses.count(s)} {s}" for s in sorted(set(statuses)))
    return (
        f"{n_models:>6} {n_gpus:>5} {n_nodes:>5} {statistics.median(times):>9.2f} {max(times):>7.2f}"
        f"  {counts:<22} {statistics.median(objs):>14.0f} {statistics.median(greedys):>14.0f}"
        f" {min(gains):>9.4f}% {statistics.median(gains):>9.4f}% {better:>3}/{seeds:<3}"
        f" {statistics.median(opt_gaps):>9.5f}% {max(opt_gaps):>9.5f}% {statistics.median(layer_gains):>9.2f}%"
    )


def _layers(spec: ClusterSpec, res: PlacementResult) -> int:
    """Priority-weighted GPU layers (the second part of the objective)."""
    prio = {m.name: m.priority + 1 for m in spec.models}
    return sum(prio[a.model] * a.gpu_layers for a in res.assignments)


HEADER = (
    f"{'models':>6} {'GPUs':>5} {'nodes':>5} {'median s':>9} {'max s':>7}  {'status':<22}"
    f" {'objective':>14} {'greedy':>14} {'min gain':>10} {'med gain':>10} {'>greedy':>7}"
    f" {'med gap':>10} {'max gap':>10} {'layers±':>10}"
)


def stability(params: SolveParams) -> str:
    spec = random_spec(50, 10, 5, 7)
    res = place(spec, profiles_for(spec), params=params)
    current = {(a.model, a.replica): CurrentAssignment(a.node, a.gpus, a.gpu_layers) for a in res.assignments}
    same = place(spec, profiles_for(spec), current=current, params=params)
    unchanged = {(a.model, a.replica): (a.node, a.gpus, a.gpu_layers) for a in same.assignments}
    churn = sum(1 for k, c in current.items() if unchanged.get(k) != (c.node, c.gpus, c.gpu_layers))
    target = res.assignments[0].model
    models = [m.model_copy(update={"context": m.context * 2}) if m.name == target else m for m in spec.models]
    changed = spec.model_copy(update={"models": models})
    res2 = place(changed, profiles_for(changed), current=current, params=params)
    where = {(a.model, a.replica): (a.node, a.gpus, a.gpu_layers) for a in res2.assignments}
    moved = [k for k, cur in current.items() if k[0] != target and where.get(k) != (cur.node, cur.gpus, cur.gpu_layers)]
    prio = {m.name: m.priority + 1 for m in spec.models}
    before = sum(prio[a.model] for a in res.assignments)
    after = sum(prio[a.model] for a in res2.assignments if a.model != target)
    before_others = sum(prio[a.model] for a in res.assignments if a.model != target)
    why = (
        "the re-solve placed more (priority-weighted) replicas, which ranks above moves"
        if after > before_others
        else "nothing more was placed"
    )
    return (
        f"stability: re-placed unchanged, {churn} replicas moved or changed layers\n"
        f"stability: changed {target}'s context in a 50-model cluster;"
        f" {len(moved)} other replicas moved or changed layers"
        f" (placed {len(res.assignments)} → {len(res2.assignments)}, priority-weighted {before} → "
        f"{sum(prio[a.model] for a in res2.assignments)}; {why})"
    )


POOL_HEADER = (
    f"{'models':>6} {'GPUs':>5} {'pinned':>6} {'on-dem':>6} {'demand':>7} {'median s':>9} {'max s':>7}"
    f"  {'status':<22} {'pinned ok':>9} {'on-dem ok':>9} {'in CPU':>6} {'fullest':>8}"
    f" {'pinned-only s':>13} {'all pinned: on GPU':>19}"
)


def run_pools(n_models: int, n_gpus: int, n_nodes: int, demand: float, seeds: int, params: SolveParams) -> str:
    """Swap pools on `pool_spec` clusters against the pinned models alone and against every model pinned."""
    times: list[float] = []
    pinned_times: list[float] = []
    statuses: list[str] = []
    pinned_ok: list[int] = []
    od_ok: list[int] = []
    in_cpu: list[int] = []
    fullest: list[float] = []
    all_pinned: list[int] = []
    demands: list[float] = []
    n_pinned = n_od = 0
    for seed in range(seeds):
        spec = pool_spec(n_models, n_gpus, n_nodes, seed, demand)
        od = [m for m in spec.models if m.on_demand]
        n_od, n_pinned = len(od), len(spec.models) - len(od)
        vram = sum(g.vram for n in spec.nodes for g in n.gpus)
        assert all(m.memory is not None for m in od)
        demands.append(sum(m.memory.vram for m in od if m.memory is not None) / vram)
        profiles = profiles_for(spec)
        t = time.perf_counter()
        res = place(spec, profiles, params=params)
        times.append(time.perf_counter() - t)
        statuses.append(res.status + {"greedy": "/greedy", "cp-sat-lns": "/lns"}.get(res.solver, ""))
        placed = {a.model for a in res.assignments}
        od_ok.append(sum(m.name in placed for m in od))
        pinned_ok.append(len(placed) - od_ok[-1])
        in_cpu.append(sum(len(p.members) for p in res.pools if p.gpu is None))
        # pool_bytes is the sum of the max_loaded largest members: the fullest allowed combination.
        fullest.append(max(100.0 * g.used_bytes / g.capacity_bytes for g in res.gpus if g.capacity_bytes))
        pinned_only = spec.model_copy(update={"models": [m for m in spec.models if not m.on_demand]})
        t = time.perf_counter()
        place(pinned_only, profiles_for(pinned_only), params=params)
        pinned_times.append(time.perf_counter() - t)
        every = spec.model_copy(
            update={"models": [m.model_copy(update={"residency": "pinned", "ttl": None}) for m in spec.models]}
        )
        # Every model pinned instead: how many run fully on a GPU.
        every_res = place(every, profiles_for(every), params=params)
        all_pinned.append(sum(a.gpu_layers == a.layers for a in every_res.assignments))
    counts = ",".join(f"{statuses.count(x)} {x}" for x in sorted(set(statuses)))
    return (
        f"{n_models:>6} {n_gpus:>5} {n_pinned:>6} {n_od:>6} {statistics.median(demands):>6.1f}x"
        f" {statistics.median(times):>9.2f} {max(times):>7.2f}  {counts:<22}"
        f" {min(pinned_ok):>4}/{n_pinned:<4} {min(od_ok):>4}/{n_od:<4} {max(in_cpu):>6} {max(fullest):>7.1f}%"
        f" {statistics.median(pinned_times):>13.2f} {min(all_pinned):>10}/{n_models:<8}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-models", type=int, default=500)
    ap.add_argument("--triplets-only", action="store_true", help="only the triplet rows")
    ap.add_argument("--pools-only", action="store_true", help="only the swap-pool rows")
    args = ap.parse_args()
    params = SolveParams(time_limit=args.time_limit, workers=args.workers, seed=0)
    if args.triplets_only:
        print(f"triplets, {args.seeds} seeds, time limit {args.time_limit} s, {args.workers} worker(s)")
        print(TRIPLET_HEADER)
        for k in TRIPLET_KS:
            if 3 * k <= args.max_models:
                print(run_triplets(k, args.seeds, params), flush=True)
        return
    if args.pools_only:
        print_pools(args.seeds, args.max_models, args.time_limit, args.workers, params)
        return
    print(f"random clusters, {args.seeds} seeds, time limit {args.time_limit} s, {args.workers} worker(s)")
    print(HEADER)
    for size in SIZES:
        if size[0] <= args.max_models:
            print(run_size(*size, args.seeds, params), flush=True)
    print("tight clusters (VRAM demand 90-110 % of VRAM)")
    print(HEADER)
    for size in TIGHT_SIZES:
        if size[0] <= args.max_models:
            print(run_size(*size, args.seeds, params, tight=True), flush=True)
    print("triplets (3K models filling K GPUs exactly; left = models not placed)")
    print(TRIPLET_HEADER)
    for k in TRIPLET_KS:
        if 3 * k <= args.max_models:
            print(run_triplets(k, args.seeds, params), flush=True)
    print(stability(params))
    print_pools(args.seeds, args.max_models, args.time_limit, args.workers, params)


def print_pools(seeds: int, max_models: int, time_limit: float, workers: int, params: SolveParams) -> None:
    print(f"swap pools, {seeds} seeds, time limit {time_limit} s, {workers} worker(s)")
    print(POOL_HEADER)
    for demand in POOL_DEMANDS:
        for size in POOL_SIZES:
            if size[0] <= max_models:
                print(run_pools(*size, demand, seeds, params), flush=True)


if __name__ == "__main__":
    main()
