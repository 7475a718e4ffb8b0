"""Exact fill: GPUs filled one at a time with the least slack (bin completion), a start beside first-fit.

First-fit decreasing packs large models first and leaves gaps that no later model fills; on
Falkenauer's "triplet" instances (3K models each between a quarter and half a GPU, filling K GPUs
exactly) it needs K + 2 GPUs or more, and CP-SAT started from its plan may not find the perfect
packing in its budget. Minimum Bin Slack (Gupta & Ho 1999) fills one bin at a time with the subset
of the remaining items that leaves the least slack, the largest remaining item always in it (bins
of one size: it must go somewhere, and here is as good as anywhere). Bin completion (Korf 2002)
adds backtracking where the items fit in all: the total slack is then bounded by the capacity less
the items' sizes, each GPU tries its completions from the least slack up, and a dead end takes the
next completion of an earlier GPU. Here each GPU is completed around the item with the fewest
completions (fail first), and the search is repaired a few GPUs at a time when it thrashes
(`_Search.complete`); where it finds no packing of every item, Minimum Bin Slack's plan is the answer.

It applies only where it is valid: pinned (not on-demand) replicas that may run fully offloaded,
each counted on a GPU at its full-offload VRAM and RAM on that GPU's node, with the hard rules
first-fit keeps (one replica of a model per node, llama.cpp ports, fixed ports, node RAM). Every
other replica (partial offload, CPU only, on-demand pools, multi-GPU split) and every item it leaves
out then goes first-fit (`greedy_assign(problem, preset=...)`), and the caller keeps whichever plan
scores better, so the result is a candidate, never a constraint. The search is bounded by a count
of steps (`FILL_STEPS`), not the clock: same input, same plan.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections import defaultdict
from dataclasses import dataclass

from solver.problem import Choice, Problem, Replica, ReplicaKey, units_down
from specs.enums import Runtime

FILL_STEPS = 1_500_000
"""Search steps at most for bin completion, over every GPU and every backtrack (an item looked at in a
subset search is one step): about 2–4 s on a small machine. The default of `exact_fill(steps=…)`."""
MBS_STEPS = 50_000
"""Steps at most for Minimum Bin Slack (each GPU past them takes its largest candidate alone)."""
COMPLETIONS = 24
"""Per GPU and visit, the completions (least slack first) kept to try."""
DIVE_STEPS = 25_000
"""Steps of bin completion's depth-first search whose deepest plan the repairs start from."""
REPAIR_STEPS = 10_000
"""Steps of one repair (a few GPUs emptied and completed again)."""
REPAIR_GPUS = 10
"""The most GPUs of the plan one repair empties."""
ENUM_STEPS = 4_000
"""Per GPU and visit, steps at most while enumerating its completions."""
COUNT_STEPS = 400
"""Per candidate anchor, steps to count its completions (up to two) when choosing the anchor."""


@dataclass(frozen=True)
class _Item:
    replica: Replica
    llama: bool
    """A pinned llama.cpp replica: it takes a port on its node."""
    port: int | None


@dataclass
class _Cands:
    """The items that may go on one GPU now, largest first, with what the subset search needs."""

    gi: int
    node: str
    cap: int
    items: list[tuple[int, _Item]]
    ram: int
    ports: int

    def __post_init__(self) -> None:
        self.sizes = [s for s, _ in self.items]
        self.neg = [-s for s in self.sizes]
        self.suffix = [0] * (len(self.sizes) + 1)
        for i in range(len(self.sizes) - 1, -1, -1):
            self.suffix[i] = self.suffix[i + 1] + self.sizes[i]
        self.name = [it.replica.model.name for _, it in self.items]
        self.ram_of = [it.replica.needs[self.node].r_full for _, it in self.items]
        self.llama = [it.llama for _, it in self.items]
        self.port = [it.port if it.llama else None for _, it in self.items]
        # Items alike on this GPU (size, RAM, port): one of them tried in a place stands for all.
        self.sig = [
            (s, it.replica.needs[self.node].r_full, it.llama, it.port, it.replica.model.name if it.llama else "")
            for s, it in self.items
        ]


class _State:
    """What the GPUs filled so far hold, undoable: per node RAM and ports left, models on it, fixed ports."""

    def __init__(self, problem: Problem) -> None:
        self.ram = {n: units_down(b) for n, b in problem.node_ram.items()}
        self.ports = dict(problem.port_slots)
        self.models: dict[str, set[str]] = defaultdict(set)
        self.fixed: set[tuple[str, int]] = set()

    def apply(self, node: str, items: list[_Item], sign: int) -> None:
        for it in items:
            r = it.replica
            self.ram[node] -= sign * r.needs[node].r_full
            if it.llama:
                self.ports[node] -= sign
                if it.port is not None:
                    if sign > 0:
                        self.fixed.add((node, it.port))
                    else:
                        self.fixed.discard((node, it.port))
            if sign > 0:
                self.models[node].add(r.model.name)
            else:
                self.models[node].discard(r.model.name)


def full_gpus(problem: Problem, r: Replica) -> list[int]:
    """The candidate GPUs where replica `r` may go fully offloaded and fits alone (VRAM): none for an
    on-demand replica (its pool is first-fit's), one that must keep layers on the CPU, or a blocked one."""
    if r.key in problem.blocked or r.model.on_demand or r.ngl_range()[1] != r.n_layers:
        return []
    gpus = problem.gpus
    return [g for g in problem.gpu_cands.get(r.key, []) if r.needs[gpus[g].node].v_full <= units_down(gpus[g].capacity)]


class _Search:
    def __init__(self, problem: Problem, limit: int = FILL_STEPS) -> None:
        self.problem = problem
        self.steps = 0
        self.limit = limit
        caps = [units_down(g.capacity) for g in problem.gpus]
        self.cap = caps
        self.items: list[_Item] = []
        self.cands: dict[ReplicaKey, set[int]] = {}
        for r in problem.replicas:
            full = full_gpus(problem, r)
            if full:
                llama = r.model.runtime is Runtime.LLAMACPP
                self.items.append(_Item(r, llama, r.model.port if llama else None))
                self.cands[r.key] = set(full)
        # GPUs largest first (then in spec order): the large bins take the large items.
        self.bins = sorted((gi for gi, c in enumerate(caps) if c > 0), key=lambda gi: (-caps[gi], gi))
        # Every GPU alike for every item (one size, all its candidates, one VRAM need, no ports, no two
        # replicas of a model, RAM for all): an item that cannot complete one GPU can complete none.
        all_bins = set(self.bins)
        ram = min((units_down(b) for b in problem.node_ram.values()), default=0)
        self.uniform = (
            len({caps[g] for g in self.bins}) == 1
            and all(self.cands[it.replica.key] == all_bins and not it.llama for it in self.items)
            and all(len({it.replica.needs[problem.gpus[g].node].v_full for g in self.bins}) == 1 for it in self.items)
            and len({it.replica.model.name for it in self.items}) == len(self.items)
            and sum(
                max(it.replica.needs[n].r_full for n in {problem.gpus[g].node for g in self.bins}) for it in self.items
            )
            <= ram
        )

    # ------------------------------------------------------------------ one GPU

    def prepare(self, gi: int, left: list[_Item], state: _State) -> _Cands:
        """The items of `left` that may go on GPU `gi` now, largest first."""
        node = self.problem.gpus[gi].node
        cap = self.cap[gi]
        self.steps += len(left) // 4  # a look at every item left counts too
        cands: list[tuple[int, _Item]] = []
        for it in left:
            r = it.replica
            if gi not in self.cands[r.key] or r.model.name in state.models[node]:
                continue
            need = r.needs[node]
            if need.v_full > cap or need.r_full > state.ram[node]:
                continue
            if it.llama and (state.ports.get(node, 0) <= 0 or (it.port is not None and (node, it.port) in state.fixed)):
                continue
            cands.append((need.v_full, it))
        cands.sort(key=lambda c: (-c[0], c[1].replica.key))
        return _Cands(gi, node, cap, cands, state.ram[node], state.ports.get(node, 0))

    def completions(
        self, c: _Cands, anchor: int, max_slack: int, want: int, steps: int, count_only: bool = False
    ) -> list[tuple[int, list[_Item]]]:
        """Subsets of the candidates `c` holding `c.items[anchor]` that fit on the GPU with at most
        `max_slack` units free, least slack first (at most `want`; with `count_only`, the first `want`
        found). At most `steps` steps (items looked at)."""
        cands, sizes, neg, suffix, sig = c.items, c.sizes, c.neg, c.suffix, c.sig
        n = len(cands)
        smallest = sizes[-1]
        found: list[tuple[int, list[int]]] = []
        budget = [steps]

        name, ram, llama, port = c.name, c.ram_of, c.llama, c.port
        # What the subset being built holds: models, RAM, llama.cpp replicas (ports) and fixed ports.
        names: set[str] = set()
        fixed: set[int] = set()
        used = [0, 0]

        def ok(t: int) -> bool:
            if name[t] in names or used[0] + ram[t] > c.ram:
                return False
            return not llama[t] or (used[1] + 1 <= c.ports and port[t] not in fixed)

        def push(t: int, sign: int) -> None:
            p = port[t]
            if sign > 0:
                names.add(name[t])
                if p is not None:
                    fixed.add(p)
            else:
                names.discard(name[t])
                if p is not None:
                    fixed.discard(p)
            used[0] += sign * ram[t]
            used[1] += sign * llama[t]

        def done() -> bool:
            if count_only:
                return len(found) >= want
            return (len(found) >= want and found[-1][0] == 0) or budget[0] <= 0

        def enum(j: int, room: int, chosen: list[int]) -> None:
            budget[0] -= 1
            start = max(j, bisect.bisect_left(neg, -room))  # the first item no larger than the room
            # Items that leave at most max_slack, then (past a gap) those that leave room for one more item.
            e1 = bisect.bisect_right(neg, -(room - max_slack)) if room > max_slack else n
            e2 = bisect.bisect_left(neg, -(room - smallest))
            prev: tuple[object, ...] | None = None
            for t in itertools.chain(range(start, e1), range(max(start, e1, e2), n)):
                budget[0] -= 1
                if suffix[t] < room - max_slack or budget[0] <= 0:
                    break  # the items left cannot bring the slack down to max_slack
                if t == anchor or sig[t] == prev or not ok(t):
                    continue  # an item like the one just tried adds nothing new
                prev = sig[t]
                chosen.append(t)
                push(t, 1)
                rest = room - sizes[t]
                if rest <= max_slack:
                    found.append((rest, chosen[:]))
                    if not count_only and len(found) > 4 * want + 64:
                        found.sort(key=lambda f: (f[0], sorted(f[1])))  # keep the least slack only
                        del found[want:]
                if rest >= smallest and not done():
                    enum(t + 1, rest, chosen)
                chosen.pop()
                push(t, -1)
                if done():
                    return

        room = c.cap - sizes[anchor]
        push(anchor, 1)
        if room <= max_slack:
            found.append((room, [anchor]))
        if room >= smallest and not done():
            enum(0, room, [anchor])
        self.steps += steps - max(budget[0], 0)
        if not count_only:
            found.sort(key=lambda f: (f[0], sorted(f[1])))
        return [(slack, [cands[t][1] for t in sub]) for slack, sub in found[:want]]

    # ------------------------------------------------------------------ all GPUs

    def complete(self) -> dict[int, list[_Item]] | None:
        """Bin completion: every item on the GPUs with at most the total slack there is; None when the
        steps run out first or it cannot be done this way.

        A depth-first search thrashes below a wrong early choice. It runs with a fifth of the steps; if it
        does not finish, the deepest plan it had reached in its first `DIVE_STEPS` is repaired, a
        neighbourhood at a time: a few of its GPUs (drawn by a generator seeded with 0) are emptied, and
        the same search completes them and the GPUs not filled yet with their items and those left over;
        a repair that fills as many GPUs or more is kept. (On 20 seeds of triplets, the plain search packed
        every K = 20 instance and few of K = 40; the repairs from an early plan most of K = 40 but not every
        K = 20: a neighbourhood of random GPUs may never free what the items left over need.)
        """
        problem = self.problem
        if not self.items or not 0 <= self.waste(self.bins, self.items) <= max(self.cap):
            return None  # not all fit, or with a GPU's worth to spare (first-fit does well there)
        ok, plan = self.dfs(self.bins, self.items, _State(problem), self.limit // 5, DIVE_STEPS)
        if not ok and self.steps < self.limit // 5:
            return None  # the search ended before its steps did: no packing of every item it would find
        rng = random.Random(0)
        while not ok and self.steps < self.limit and plan:
            freed = set(rng.sample(sorted(plan), min(len(plan), rng.randint(2, REPAIR_GPUS))))
            kept = {g: sub for g, sub in plan.items() if g not in freed}
            state = _State(problem)
            for g, sub in kept.items():
                state.apply(problem.gpus[g].node, sub, 1)
            placed = {id(it) for sub in kept.values() for it in sub}
            bins = [g for g in self.bins if g not in kept]
            ok, part = self.dfs(
                bins,
                [it for it in self.items if id(it) not in placed],
                state,
                min(self.limit, self.steps + REPAIR_STEPS),
            )
            if ok or len(kept) + len(part) >= len(plan):
                plan = kept | part
        return plan if ok else None

    def waste(self, bins: list[int], items: list[_Item]) -> int:
        """The most slack there may be on `bins` with every one of `items` on them (each needs at least its
        least full-offload VRAM over its GPUs); negative when they cannot all fit."""
        gpus = self.problem.gpus
        least = sum(min(it.replica.needs[gpus[g].node].v_full for g in self.cands[it.replica.key]) for it in items)
        return sum(self.cap[g] for g in bins) - least

    def dfs(
        self, bins: list[int], items: list[_Item], state: _State, limit: int, early: int | None = None
    ) -> tuple[bool, dict[int, list[_Item]]]:
        """Depth-first bin completion of `bins` with `items` from `state` until `self.steps` reaches `limit`:
        whether every item went on them, and that plan (or the deepest one reached, in its first `early`
        steps where given)."""
        problem = self.problem
        plan: dict[int, list[_Item]] = {}
        deepest: dict[int, list[_Item]] = {}
        record_until = self.steps + (limit if early is None else early)

        def go(b: int, left: list[_Item], waste: int) -> bool:
            nonlocal deepest
            if len(plan) > len(deepest) and self.steps <= record_until:
                deepest = dict(plan)
            if not left:
                return True
            if b == len(bins) or self.steps >= limit:
                return False
            gi = bins[b]
            node = problem.gpus[gi].node
            c = self.prepare(gi, left, state)
            options: list[tuple[int, list[_Item]]] = []
            if not c.items:
                options = [(c.cap, [])] if c.cap <= waste else []
            else:
                anchor = self.anchor(c, waste)
                if anchor is not None:
                    options = self.completions(c, anchor, waste, COMPLETIONS, ENUM_STEPS)
            for slack, sub in options:
                if self.steps >= limit:
                    return False
                state.apply(node, sub, 1)
                plan[gi] = sub
                ids = {id(it) for it in sub}
                if go(b + 1, [it for it in left if id(it) not in ids], waste - slack):
                    return True
                state.apply(node, sub, -1)
                del plan[gi]
            return False

        waste = self.waste(bins, items)
        if waste >= 0 and go(0, items, waste):
            return True, plan
        return False, deepest

    def anchor(self, c: _Cands, waste: int) -> int | None:
        """The item to complete this GPU around: the one with the fewest completions (fail first; of
        those, the largest). None: some item has none, and where every GPU is alike (`uniform`) it has
        none anywhere else either, a dead end."""
        best: tuple[int, int] | None = None
        prev: tuple[object, ...] | None = None
        for a in range(len(c.items)):
            if c.sig[a] == prev:
                continue
            prev = c.sig[a]
            before = self.steps
            n = len(self.completions(c, a, waste, 2, COUNT_STEPS, count_only=True))
            if n == 0 and self.steps - before >= COUNT_STEPS:
                n = 2  # not known: the count ran out of steps
            if n == 0 and self.uniform:
                return None
            if n and (best is None or n < best[0]):
                best = (n, a)
            if self.steps >= self.limit:
                break
        return None if best is None else best[1]

    def min_slack(self) -> dict[int, list[_Item]]:
        """Minimum Bin Slack without backtracking: each GPU in turn takes its least-slack completion."""
        state = _State(self.problem)
        plan: dict[int, list[_Item]] = {}
        left = list(self.items)
        base = self.steps
        for gi in self.bins:
            node = self.problem.gpus[gi].node
            c = self.prepare(gi, left, state)
            if not c.items:
                continue
            steps = min(ENUM_STEPS, max(0, base + MBS_STEPS - self.steps))
            best = self.completions(c, 0, self.cap[gi], 1, steps) if steps else [(0, [c.items[0][1]])]  # slack unused
            if not best or not best[0][1]:
                continue
            sub = best[0][1]
            state.apply(node, sub, 1)
            plan[gi] = sub
            ids = {id(it) for it in sub}
            left = [it for it in left if id(it) not in ids]
        return plan


def exact_fill(problem: Problem, steps: int = FILL_STEPS) -> list[Choice]:
    """Full-offload choices for the pinned replicas that fill GPUs with the least slack (see the module
    docstring): the perfect packing where the search finds one, else Minimum Bin Slack's plan. The
    replicas it leaves out are not in the list (first-fit places them after)."""
    search = _Search(problem, steps)
    plan = search.complete()
    if plan is None:
        plan = search.min_slack()
    out: list[Choice] = []
    for gi in sorted(plan):
        node = problem.gpus[gi].node
        for it in plan[gi]:
            out.append(Choice(it.replica.key, node, gi, it.replica.n_layers))
    return sorted(out, key=lambda c: c.key)
