"""First-fit decreasing placement: the benchmark's baseline and CP-SAT's fallback.

Like GPUStack's binpack: replicas by priority (highest first), then by VRAM at
full offload (largest first); each goes to the first GPU, in spec order, where
it fits fully; failing that, to the GPU where the most layers fit; failing that,
to the first node whose RAM takes it on the CPU. The same hard constraints as
the CP-SAT model hold, counted in the same rounded MiB.
"""

from __future__ import annotations

from collections import defaultdict

from solver.problem import Choice, Problem, Replica, units_down, vram_at
from specs.enums import Runtime


def _full_vram(r: Replica) -> int:
    return max((vram_at(c, r.n_layers) for c in r.curves.values()), default=0)


def greedy_assign(problem: Problem, keep_current: bool = False) -> list[Choice]:
    """Choices of the first-fit-decreasing heuristic (see the module docstring).

    With `keep_current`, replicas that run somewhere now are first put back where
    they run (by priority, with as many GPU layers as fit there), and the rest
    then go first-fit decreasing: the stable starting point for CP-SAT.
    """
    free = [units_down(g.capacity) for g in problem.gpus]
    ram_free = {n: units_down(b) for n, b in problem.node_ram.items()}
    ports_free = dict(problem.port_slots)
    fixed_ports: set[tuple[str, int]] = set()
    model_nodes: dict[str, set[str]] = defaultdict(set)
    order = sorted(
        (r for r in problem.replicas if r.key not in problem.blocked),
        key=lambda r: (-r.model.priority, -_full_vram(r), r.key),
    )
    out: list[Choice] = []

    def node_ok(r: Replica, node: str) -> bool:
        if node in model_nodes[r.model.name]:
            return False
        if r.model.runtime is Runtime.LLAMACPP:
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

    kept = {r.key for r in order if keep_current and at_current(r)}
    for r in order:
        if r.key in kept:
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
