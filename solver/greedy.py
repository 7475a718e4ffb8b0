"""First-fit decreasing placement: the benchmark's baseline and CP-SAT's fallback.

Like GPUStack's binpack: replicas by priority (highest first), then by VRAM at
full offload (largest first); each goes to the first GPU, in spec order, where
it fits fully; failing that, to the GPU where the most layers fit; failing that,
to the first node whose RAM takes it on the CPU. The same hard constraints as
the CP-SAT model hold, counted in the same rounded MiB.

Pinned replicas go first; then on-demand models, each into the first GPU pool
(in spec order) that can grow to take it — a pool's size is the sum of its
`max_loaded` largest members' needs — failing that into a CPU pool.
"""

from __future__ import annotations

from collections import defaultdict

from solver.problem import Choice, Problem, Replica, top_k_sum, units_down, vram_at
from specs.enums import Runtime


def _full_vram(r: Replica) -> int:
    return max((vram_at(c, r.n_layers) for c in r.curves.values()), default=0)


def greedy_assign(problem: Problem, keep_current: bool = False, preset: list[Choice] | None = None) -> list[Choice]:
    """Choices of the first-fit-decreasing heuristic (see the module docstring).

    With `keep_current`, replicas that run somewhere now are first put back where
    they run (by priority, with as many GPU layers as fit there), and the rest
    then go first-fit decreasing: the stable starting point for CP-SAT.
    With `preset` (single-GPU choices, e.g. `solver.fill.exact_fill`'s), those are
    taken first where they fit, and the rest go first-fit decreasing.
    """
    free = [units_down(g.capacity) for g in problem.gpus]
    ram_free = {n: units_down(b) for n, b in problem.node_ram.items()}
    ports_free = dict(problem.port_slots)
    fixed_ports: set[tuple[str, int]] = set()
    model_nodes: dict[str, set[str]] = defaultdict(set)
    order = sorted(
        (r for r in problem.replicas if r.key not in problem.blocked),
        key=lambda r: (r.model.on_demand, -r.model.priority, -_full_vram(r), r.key),
    )
    out: list[Choice] = []
    # Swap pools by place (GPU index, or node name for its CPU): runtime, members' (VRAM, RAM) in units,
    # and the size (VRAM, RAM) taken from `free`/`ram_free` now.
    pools: dict[int | str, tuple[Runtime, list[tuple[int, int]], int, int]] = {}

    def pool_growth(r: Replica, node: str, gpu: int | None) -> tuple[int, int] | None:
        """(VRAM, RAM) units the pool at `gpu` (or node's CPU) grows by with `r`; None when its runtime differs."""
        need = r.needs[node]
        own = (need.v_full, need.r_full) if gpu is not None else (0, need.r0)
        where: int | str = node if gpu is None else gpu
        runtime, members, v_now, r_now = pools.get(where, (r.model.runtime, [], 0, 0))
        if runtime is not r.model.runtime:
            return None
        if not members and r.model.runtime is Runtime.LLAMACPP and ports_free.get(node, 0) <= 0:
            return None  # a new llama.cpp pool needs a port
        k = problem.max_loaded(node, r.model.runtime)
        grown = [*members, own]
        return top_k_sum([v for v, _ in grown], k) - v_now, top_k_sum([b for _, b in grown], k) - r_now

    def join(r: Replica, node: str, gpu: int | None) -> bool:
        """Put on-demand `r` in the pool at `gpu` (or node's CPU) if it grows into the room left."""
        if node in model_nodes[r.model.name]:
            return False
        growth = pool_growth(r, node, gpu)
        if growth is None or growth[1] > ram_free[node] or (gpu is not None and growth[0] > free[gpu]):
            return False
        need = r.needs[node]
        where: int | str = node if gpu is None else gpu
        runtime, members, v_now, r_now = pools.get(where, (r.model.runtime, [], 0, 0))
        if not members and runtime is Runtime.LLAMACPP:
            ports_free[node] -= 1
        members.append((need.v_full, need.r_full) if gpu is not None else (0, need.r0))
        pools[where] = (runtime, members, v_now + growth[0], r_now + growth[1])
        if gpu is not None:
            free[gpu] -= growth[0]
        ram_free[node] -= growth[1]
        model_nodes[r.model.name].add(node)
        out.append(Choice(r.key, node, gpu, r.n_layers if gpu is not None else 0))
        return True

    def join_any(r: Replica) -> bool:
        if any(join(r, problem.gpus[gi].node, gi) for gi in problem.gpu_cands[r.key]):
            return True
        return any(join(r, n, None) for n in problem.cpu_cands[r.key])

    def node_ok(r: Replica, node: str) -> bool:
        if node in model_nodes[r.model.name]:
            return False
        if r.model.runtime is Runtime.LLAMACPP and not r.model.on_demand:
            if ports_free.get(node, 0) <= 0:
                return False
            if r.model.port is not None and (node, r.model.port) in fixed_ports:
                return False
        return True

    def take(r: Replica, node: str, gpu: int | None, ngl: int) -> None:
        need = r.needs[node]
        if gpu is not None:
            free[gpu] -= need.vram(ngl)
        ram_free[node] -= need.ram(ngl)
        model_nodes[r.model.name].add(node)
        if r.model.runtime is Runtime.LLAMACPP:
            ports_free[node] -= 1
            if r.model.port is not None:
                fixed_ports.add((node, r.model.port))
        out.append(Choice(r.key, node, gpu, ngl))

    def at_current(r: Replica) -> bool:
        cur = problem.current.get(r.key)
        if cur is None or not node_ok(r, cur.node):
            return False
        if r.model.on_demand:
            if not cur.gpus:
                return cur.node in problem.cpu_cands[r.key] and join(r, cur.node, None)
            gpu = next((g for g in problem.gpu_cands[r.key] if problem.gpus[g].key == (cur.node, cur.gpus[0])), None)
            return len(cur.gpus) == 1 and gpu is not None and join(r, cur.node, gpu)
        lo, hi = r.ngl_range()
        if not cur.gpus:
            if cur.node in problem.cpu_cands[r.key] and r.needs[cur.node].r0 <= ram_free[cur.node]:
                take(r, cur.node, None, 0)
                return True
            return False
        if len(cur.gpus) != 1:
            return False
        gi = next((g for g in problem.gpu_cands[r.key] if problem.gpus[g].key == (cur.node, cur.gpus[0])), None)
        if gi is None:
            return False
        need = r.needs[cur.node]
        full = hi == r.n_layers and need.full_fits(free[gi], ram_free[cur.node])
        k_lo, k_hi = need.partial_range(lo, free[gi], ram_free[cur.node]) if lo < r.n_layers else (1, 0)
        # Its present layer count when that still fits (unchanged, it need not restart), else the most that fit.
        now = cur.gpu_layers
        if now is not None and ((now == r.n_layers and full) or k_lo <= now <= min(k_hi, r.n_layers - 1)):
            take(r, cur.node, gi, now)
            return True
        if full:
            take(r, cur.node, gi, hi)
            return True
        if k_lo <= k_hi:
            take(r, cur.node, gi, k_hi)
            return True
        return False

    def at_preset(r: Replica, ch: Choice) -> bool:
        if r.model.on_demand or ch.gpu is None or ch.split or not node_ok(r, ch.node):
            return False
        if ch.gpu not in problem.gpu_cands[r.key]:
            return False
        need = r.needs[ch.node]
        if need.vram(ch.ngl) > free[ch.gpu] or need.ram(ch.ngl) > ram_free[ch.node]:
            return False
        take(r, ch.node, ch.gpu, ch.ngl)
        return True

    kept = {r.key for r in order if keep_current and at_current(r)}
    if preset:
        by_key = {r.key: r for r in order}
        kept |= {ch.key for ch in preset if ch.key in by_key and ch.key not in kept and at_preset(by_key[ch.key], ch)}
    for r in order:
        if r.key in kept:
            continue
        if r.model.on_demand:
            join_any(r)
            continue
        lo, hi = r.ngl_range()
        gpus = [gi for gi in problem.gpu_cands[r.key] if node_ok(r, problem.gpus[gi].node)]

        def fits(gi: int, ngl: int, r: Replica = r) -> bool:
            node = problem.gpus[gi].node
            need = r.needs[node]
            return need.vram(ngl) <= free[gi] and need.ram(ngl) <= ram_free[node]

        full = next((gi for gi in gpus if fits(gi, hi)), None)
        if full is not None:
            take(r, problem.gpus[full].node, full, hi)
            continue
        best: tuple[int, int] | None = None
        for gi in gpus:
            if lo >= r.n_layers:
                continue
            node = problem.gpus[gi].node
            k_lo, k_hi = r.needs[node].partial_range(lo, free[gi], ram_free[node])
            if k_lo <= k_hi and (best is None or k_hi > best[1]):
                best = (gi, k_hi)
        if best is not None:
            take(r, problem.gpus[best[0]].node, best[0], best[1])
            continue
        cpu = next(
            (n for n in problem.cpu_cands[r.key] if node_ok(r, n) and r.needs[n].r0 <= ram_free[n]),
            None,
        )
        if cpu is not None:
            take(r, cpu, None, 0)
    return out
