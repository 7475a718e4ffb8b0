"""One sentence, with numbers, for every replica not placed or placed with fewer GPU layers than it has.

The numbers come from the same curves the solver used, evaluated against what
the final plan leaves free: "qwen2.5-32b needs 19.3 GiB at 32k context; the
largest free GPU it may use (desktop:0) has 11.2 GiB; it fits fully at 8k
context or with 34 of 65 layers on GPU". Alternatives are found by re-evaluating
the estimator at smaller contexts (when the profile comes from a GGUF header)
and at fewer GPU layers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from solver.problem import (
    Assignment,
    CurrentAssignment,
    GpuSlot,
    GpuUse,
    PlacementResult,
    Pool,
    Problem,
    Replica,
    Unplaced,
    ram_at,
    top_k_sum,
    vram_at,
)
from solver.profiles import MemoryProfile, Profile
from specs.enums import Runtime

GIB = 1 << 30


def gib(n: int) -> str:
    """GiB with one decimal; MiB below a tenth of a GiB, which would read "0.0 GiB"."""
    if 0 < abs(n) < GIB // 10:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / GIB:.1f} GiB"


def ctx_text(ctx: int) -> str:
    return f"{ctx // 1024}k" if ctx % 1024 == 0 else str(ctx)


def _allowed_gpus(problem: Problem, r: Replica) -> list[int]:
    pins = r.model.placement.gpus
    return [
        gi
        for gi, g in enumerate(problem.gpus)
        if g.node in r.curves and (pins is None or g.index in pins) and not r.model.placement.cpu_only
    ]


def _fits_at_context(r: Replica, slot: GpuSlot, free: int) -> int | None:
    """The largest smaller context (halving, ≥ 512) at which the replica fits fully in `free`."""
    ctx = r.model.context // 2
    while ctx >= 512:
        curve = r.profile.at_context(slot.node, ctx)
        if curve is None:
            return None
        if vram_at(curve, curve.layers + 1) <= free:
            return ctx
        ctx //= 2
    return None


def _most_layers(r: Replica, slot: GpuSlot, free: int, ram_free: int) -> int | None:
    lo, hi = r.ngl_range()
    curve = r.curves[slot.node]
    for k in range(hi, lo - 1, -1):
        if vram_at(curve, k) <= free and ram_at(curve, k) <= ram_free:
            return k
    return None


def _alternatives(r: Replica, slot: GpuSlot, free: int, ram_free: int, partial: bool) -> str:
    alts = []
    ctx = _fits_at_context(r, slot, free)
    if ctx is not None:
        alts.append(f"fully at {ctx_text(ctx)} context")
    if not partial:
        k = _most_layers(r, slot, free, ram_free)
        if k is not None and k < r.n_layers:
            alts.append(f"with {k} of {r.n_layers} layers on GPU")
    return f"; it fits {' or '.join(alts)}" if alts else ""


def _why_unplaced(
    problem: Problem,
    r: Replica,
    free: list[int],
    ram_free: dict[str, int],
    hosts: dict[str, set[str]],
) -> str:
    name, model = r.model.name, r.model
    ctx = ctx_text(model.context)
    lo, hi = r.ngl_range()
    nodes = sorted(r.curves)
    if model.replicas > 1 and len(nodes) <= len(hosts[name]):
        return (
            f"replica {r.index} of {name} needs a node of its own; only {len(nodes)} node(s) can run it"
            f" ({', '.join(nodes)}) and they hold its other replicas"
        )
    if model.placement.cpu_only or (not problem.gpu_cands[r.key] and r.cpu_allowed()):
        need = ram_at(r.profile.curve, 0)
        best = max(nodes, key=lambda n: (ram_free[n], n))
        return (
            f"{name} runs on the CPU only here and needs {gib(need)} of RAM at {ctx} context;"
            f" the most free RAM on a node it may use ({best}) is {gib(ram_free[best])}"
        )
    gis = [gi for gi in _allowed_gpus(problem, r) if problem.gpus[gi].node not in hosts[name]]
    if not gis and hosts[name]:
        return (
            f"replica {r.index} of {name} needs a node of its own; the GPU nodes it may use"
            f" ({', '.join(sorted(hosts[name]))}) hold its other replicas"
        )
    if not gis:
        return f"{name} needs a GPU (at least {lo} layers) but none of its nodes ({', '.join(nodes)}) has one"
    gi = max(gis, key=lambda g: (free[g], -g))
    slot = problem.gpus[gi]
    curve = r.curves[slot.node]
    full = vram_at(curve, hi)
    least = min((vram_at(curve, k) for k in range(lo, hi + 1)), default=full)
    need_text = f"{gib(full)} at {ctx} context"
    if lo < hi:
        need_text += f" ({gib(least)} with {lo} of {hi} layers on GPU)"
    rule = ""
    if not model.placement.cpu_offload:
        rule = " (cpu_offload: false, so all layers must be on the GPU)"
    elif model.placement.min_gpu_layers > 0:
        rule = f" (min_gpu_layers: {model.placement.min_gpu_layers})"
    text = (
        f"{name} needs {need_text}{rule}; the largest free GPU it may use ({slot.node}:{slot.index})"
        f" has {gib(max(free[gi], 0))}"
    )
    if least <= free[gi]:
        text += f", but its node has only {gib(ram_free[slot.node])} of RAM free for the layers left on the CPU"
    return (
        text
        + _alternatives(r, slot, max(free[gi], 0), ram_free[slot.node], partial=False)
        + _split_text(problem, r, free, hosts)
    )


def _split_text(problem: Problem, r: Replica, free: list[int], hosts: dict[str, set[str]]) -> str:
    """Why a replica that may be split over several GPUs was not: the split's need against what is free."""
    pins = r.model.placement.gpus
    best: tuple[int, str, int] | None = None
    for node in sorted(r.profile.node_splits):
        if node not in r.curves or node in hosts[r.model.name]:
            continue
        gis = [gi for gi, g in enumerate(problem.gpus) if g.node == node and (pins is None or g.index in pins)]
        if len(gis) < 2:
            continue
        room = sum(max(free[gi], 0) for gi in gis)
        if best is None or room > best[0]:
            best = (room, node, len(gis))
    if best is None:
        return ""
    room, node, count = best
    sc = r.profile.node_splits[node]
    least = sum(sc.block_bytes) + sc.output_bytes + 2 * sc.device_fixed
    return (
        f"; split over {node}'s GPUs it needs at least {gib(least)} in all ({gib(sc.device_fixed)} on every GPU"
        f" it uses besides its layers), and its {count} GPUs have {gib(room)} free together"
    )


def _why_no_pool(
    problem: Problem,
    r: Replica,
    assignments: Sequence[Assignment],
    gpus: Sequence[GpuUse],
    ram_free: dict[str, int],
    pools: Sequence[Pool],
) -> str:
    """Why an on-demand model is in no pool: its need, and on the GPU (or node) nearest to taking it, what
    its pool would grow to with it and the room the pinned models (and the node's RAM) leave for that pool."""
    name, model = r.model.name, r.model
    ctx = ctx_text(model.context)
    by_place = {(p.node, p.gpu): p for p in pools}
    ports_left = dict(problem.port_slots)
    for p in pools:
        if p.runtime is Runtime.LLAMACPP:
            ports_left[p.node] -= 1
    for a in assignments:
        if not a.on_demand and problem.spec.model(a.model).runtime is Runtime.LLAMACPP:
            ports_left[a.node] -= 1

    def _ports_text(node: str) -> str:
        return f"all {problem.port_slots[node]} ports of {node}'s range are taken (pinned replicas and pools)"

    def need_of(pool: Pool | None, node: str, own: int, own_ram: int) -> tuple[int, int, str, int]:
        k = problem.max_loaded(node, model.runtime)
        if pool is None:
            return own, own_ram, "a new pool would need", k
        if pool.runtime is not model.runtime:
            return -1, -1, f"its pool holds {pool.runtime.value} models", k
        vram = [_member_need(problem, m, node, gpu=pool.gpu is not None)[0] for m in pool.members]
        rams = [_member_need(problem, m, node, gpu=pool.gpu is not None)[1] for m in pool.members]
        grown = top_k_sum([*vram, own], k)
        grown_ram = top_k_sum([*rams, own_ram], k)
        return grown, grown_ram, f"its pool ({', '.join(pool.members)}, max_loaded {k}) would grow to", k

    best: tuple[int, str] | None = None
    for gi in _allowed_gpus(problem, r):
        slot, use = problem.gpus[gi], gpus[gi]
        curve = r.curves[slot.node]
        own, own_ram = vram_at(curve, r.n_layers), ram_at(curve, r.n_layers)
        pool = by_place.get((slot.node, slot.index))
        grown, grown_ram, what, _ = need_of(pool, slot.node, own, own_ram)
        if pool is None and model.runtime is Runtime.LLAMACPP and ports_left[slot.node] <= 0:
            text, short = f"on {slot.node}:{slot.index} a new pool needs a port and {_ports_text(slot.node)}", 1 << 61
        elif grown < 0:
            text, short = f"on {slot.node}:{slot.index} {what}", 1 << 62
        else:
            room = use.capacity_bytes - (use.used_bytes - use.pool_bytes)
            ram_room = ram_free[slot.node] + (pool.ram_bytes if pool is not None else 0)
            text = f"on {slot.node}:{slot.index} {what} {gib(grown)} and the pinned models leave {gib(room)} for it"
            short = grown - room
            if grown <= room:
                text += f", but the pool needs {gib(grown_ram)} of RAM and its node has {gib(ram_room)} for it"
                short = grown_ram - ram_room
        if best is None or short < best[0]:
            best = (short, text)
    if r.cpu_allowed():
        for node in sorted(r.curves):
            need = ram_at(r.curves[node], 0)
            pool = by_place.get((node, None))
            if pool is not None and pool.runtime is not model.runtime:
                continue
            if pool is None and model.runtime is Runtime.LLAMACPP and ports_left[node] <= 0:
                if best is None:
                    best = (1 << 61, f"in {node}'s CPU pool it would need a port and {_ports_text(node)}")
                continue
            rams = [_member_need(problem, m, node, gpu=False)[1] for m in (pool.members if pool else ())]
            grown = top_k_sum([*rams, need], problem.max_loaded(node, model.runtime))
            ram_room = ram_free[node] + (pool.ram_bytes if pool is not None else 0)
            text = f"in {node}'s CPU pool it needs {gib(grown)} of RAM with its pool and the node has {gib(ram_room)}"
            if best is None or grown - ram_room < best[0]:
                best = (grown - ram_room, text)
    if best is None:
        return f"{name} (on-demand) may use no GPU and may not run on the CPU (cpu_offload/min_gpu_layers)"
    full = vram_at(r.curves[sorted(r.curves)[0]], r.n_layers)
    return f"{name} (on-demand) needs {gib(full)} loaded at {ctx} context, fully on one GPU; {best[1]}"


def _member_need(problem: Problem, model: str, node: str, gpu: bool) -> tuple[int, int]:
    """(VRAM, RAM) an on-demand member needs while loaded on `node`: fully offloaded, or on the CPU."""
    r = next(r for r in problem.replicas if r.model.name == model)
    curve = r.curves[node]
    ngl = r.n_layers if gpu else 0
    return vram_at(curve, ngl), ram_at(curve, ngl)


def explain(
    problem: Problem,
    assignments: Sequence[Assignment],
    gpus: Sequence[GpuUse],
    pools: Sequence[Pool] = (),
) -> tuple[tuple[Unplaced, ...], tuple[str, ...]]:
    """(unplaced replicas with their reason, notes on replicas with fewer GPU layers than they have)."""
    free = [g.capacity_bytes - g.used_bytes for g in gpus]
    ram_free = dict(problem.node_ram)
    hosts: dict[str, set[str]] = defaultdict(set)
    for a in assignments:
        if not a.on_demand:
            ram_free[a.node] -= a.ram_bytes  # on-demand members count in their pool's RAM
        hosts[a.model].add(a.node)
    # A pinned replica is placed before every on-demand model: one left out does not fit beside the
    # other pinned ones alone, so its reason counts the room the pools take as free.
    free_pinned = [g.capacity_bytes - (g.used_bytes - g.pool_bytes) for g in gpus]
    ram_free_pinned = dict(ram_free)
    for p in pools:
        ram_free[p.node] -= p.ram_bytes
    placed = {(a.model, a.replica): a for a in assignments}
    unplaced: list[Unplaced] = []
    notes: list[str] = []
    for r in problem.replicas:
        got = placed.get(r.key)
        if r.key in problem.blocked:
            unplaced.append(Unplaced(r.key[0], r.key[1], problem.blocked[r.key]))
        elif got is None and r.model.on_demand:
            unplaced.append(Unplaced(r.key[0], r.key[1], _why_no_pool(problem, r, assignments, gpus, ram_free, pools)))
        elif got is None:
            reason = _why_unplaced(problem, r, free_pinned, ram_free_pinned, hosts)
            unplaced.append(Unplaced(r.key[0], r.key[1], reason))
        elif got.gpus and got.gpu_layers < got.layers:
            gi = next(i for i, g in enumerate(problem.gpus) if g.key == (got.node, got.gpus[0]))
            slot = problem.gpus[gi]
            own = got.vram_bytes[slot.index]
            room = free[gi] + own
            full = vram_at(r.curves[got.node], got.layers)
            notes.append(
                f"{r.model.name} has {got.gpu_layers} of {got.layers} layers on GPU {slot.node}:{slot.index}:"
                f" full offload needs {gib(full)} at {ctx_text(r.model.context)} context and the GPU has"
                f" {gib(room)} for it besides the other models"
                + _alternatives(r, slot, room, ram_free[got.node] + got.ram_bytes, partial=True)
            )
    # Blocked models (no estimate) are not in problem.replicas: add them in spec order.
    seen = {(u.model, u.replica) for u in unplaced}
    for k, reason in sorted(problem.blocked.items()):
        if k not in seen:
            unplaced.append(Unplaced(k[0], k[1], reason))
    return tuple(unplaced), tuple(notes)


def calibration_lines(
    profiles: Mapping[str, Profile],
    placement: PlacementResult,
    current: Mapping[tuple[str, int], CurrentAssignment] | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(one line per model and node whose reservation a measurement raised, warnings).

    A line: "chat: measured 9.80 GiB VRAM on workstation:0, estimate 9.40 GiB (reserved 10.29 GiB)". A warning
    for a replica that runs (`current`) where it was measured above its estimate and that the placement, with the
    raised reservation, can no longer leave as it is: moved, given fewer GPU layers, or not placed at all — before
    it runs out of memory there.
    """
    lines: list[str] = []
    warnings: list[str] = []
    placed = {(a.model, a.replica): a for a in placement.assignments}
    for model, profile in sorted(profiles.items()):
        if not isinstance(profile, MemoryProfile):
            continue
        for node, note in sorted(profile.calibrated.items()):
            text = note.text(model)
            lines.append(text)
            for (name, replica), now in sorted((current or {}).items()):
                if now.node != node:
                    continue
                got = placed.get((name, replica))
                label = name if replica == 0 else f"{name}#{replica}"
                subject = "it" if name == model else f"{label} (running beside it)"
                if got is None:
                    fate = f"{subject} fits nowhere now and is not placed"
                elif not now.same_place(got.node, got.gpus):
                    where = f"{got.node}:{','.join(map(str, got.gpus))}" if got.gpus else f"{got.node} (CPU)"
                    fate = f"{subject} no longer fits there; the plan moves {label} to {where}"
                elif now.gpu_layers is not None and got.gpu_layers < now.gpu_layers:
                    fate = f"{subject} no longer fits there fully; the plan lowers its GPU layers to {got.gpu_layers}"
                else:
                    continue
                warnings.append(f"{text}: {fate}")
    return tuple(lines), tuple(warnings)
