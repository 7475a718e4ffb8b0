"""On-demand models in swap pools (issue 17): sizing, objective order, stability, ports, explanations.

The property test recomputes every byte outside the solver, from the declared memory, and enumerates every
combination of at most `max_loaded` members loaded in each pool: pinned + loaded fits every GPU and node.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from solver.place import SolveParams, greedy_place, place
from solver.problem import CurrentAssignment, PlacementResult, Pool
from solver.profiles import declared_curve, profiles_for
from specs.model import ClusterSpec
from tests.solver.placecases import llama_node, model, ollama_node, spec
from tests.solver.test_place_props import neighbourhood_search

GIB = 1 << 30
PARAMS = SolveParams(time_limit=3.0)
OD = "    residency: on-demand\n"


@st.composite
def pool_clusters(draw: st.DrawFn) -> ClusterSpec:
    """Nodes offering llama.cpp, Ollama or both, with pinned and on-demand models (on-demand demand often
    several times the VRAM), and max_loaded 1 … 3."""
    nodes = []
    for i in range(draw(st.integers(1, 3))):
        gpus = [
            {"index": j, "name": "g", "vram": draw(st.sampled_from([4, 8, 12, 24])) * GIB}
            for j in range(draw(st.integers(0, 2)))
        ]
        node: dict[str, object] = {
            "name": f"n{i}",
            "tier": "local",
            "address": "h",
            "ram": draw(st.sampled_from([8, 16, 32])) * GIB,
            "ram_reserve": GIB,
            "gpus": gpus,
        }
        kind = draw(st.sampled_from(["llamacpp", "ollama", "both"]))
        if kind in ("llamacpp", "both"):
            node["docker"] = {"endpoint": "unix:///var/run/docker.sock"}
            node["llamacpp"] = {
                "image": "llama",
                "ports": draw(st.sampled_from(["3000-3001", "3000-3009"])),
                "max_loaded": draw(st.integers(1, 3)),
            }
        if kind in ("ollama", "both"):
            node["ollama"] = {"url": "http://h:1", "max_loaded": draw(st.integers(1, 3))}
        nodes.append(node)
    runtimes = sorted({rt for n in nodes for rt in ("llamacpp", "ollama") if rt in n})
    models = []
    for i in range(draw(st.integers(1, 10))):
        runtime = draw(st.sampled_from(runtimes))
        layers = draw(st.one_of(st.none(), st.integers(4, 40)))
        on_demand = draw(st.booleans())
        models.append(
            {
                "name": f"m{i}",
                "runtime": runtime,
                "source": {"ollama": f"m{i}"} if runtime == "ollama" else {"gguf": f"/m/m{i}.gguf"},
                "priority": draw(st.integers(0, 100)),
                "memory": {
                    "vram": draw(st.integers(GIB // 4, 14 * GIB)),
                    "ram": draw(st.integers(0, 2 * GIB)),
                    **({"layers": layers} if layers else {}),
                },
                "placement": {"cpu_offload": draw(st.booleans())},
                **({"residency": "on-demand"} if on_demand else {}),
            }
        )
    return ClusterSpec.model_validate({"cluster": {"name": "p"}, "nodes": nodes, "models": models})


def check_pools(s: ClusterSpec, r: PlacementResult) -> None:
    """Every allowed combination of loaded members, beside the pinned models, fits every GPU and node."""
    pinned_vram: dict[tuple[str, int], int] = defaultdict(int)
    pinned_ram: dict[str, int] = defaultdict(int)
    need: dict[str, tuple[int, int]] = {}
    for a in r.assignments:
        m = s.model(a.model)
        assert m.memory is not None
        curve = declared_curve(m.memory)
        assert a.on_demand == m.on_demand
        if a.on_demand:
            # A member is fully offloaded on one GPU, or in a CPU pool.
            assert a.gpu_layers in (0, curve.layers + 1)
            assert bool(a.gpus) == (a.gpu_layers > 0) and len(a.gpus) <= 1
            need[a.model] = (curve.vram(a.gpu_layers) if a.gpu_layers else 0, curve.ram(a.gpu_layers))
            continue
        if a.gpu_layers:
            pinned_vram[a.node, a.gpus[0]] += curve.vram(a.gpu_layers)
        pinned_ram[a.node] += curve.ram(a.gpu_layers)
    members = sorted(a.model for a in r.assignments if a.on_demand)
    assert sorted(x for p in r.pools for x in p.members) == members
    assert len({p.key for p in r.pools}) == len(r.pools), "one pool per GPU (and per node's CPU)"
    by_node: dict[str, list[Pool]] = defaultdict(list)
    for p in r.pools:
        node = s.node(p.node)
        rt = node.llamacpp if p.runtime.value == "llamacpp" else node.ollama
        assert rt is not None and p.max_loaded == rt.max_loaded
        for name in p.members:
            a = next(a for a in r.assignments if a.model == name)
            assert s.model(name).runtime is p.runtime and a.node == p.node
            assert a.gpus == (() if p.gpu is None else (p.gpu,))
        sizes = [need[x] for x in p.members]
        assert p.size_bytes == sum(sorted((v for v, _ in sizes), reverse=True)[: p.max_loaded])
        by_node[p.node].append(p)
    for node in s.nodes:
        pools = by_node[node.name]
        # Every combination of at most max_loaded loaded members per pool (pools load independently).
        per_pool = [
            [c for k in range(p.max_loaded + 1) for c in itertools.combinations(p.members, min(k, len(p.members)))]
            for p in pools
        ]
        for combo in itertools.product(*per_pool):
            loaded = [x for c in combo for x in c]
            assert pinned_ram[node.name] + sum(need[x][1] for x in loaded) <= node.ram - node.ram_reserve
            for g in node.gpus:
                on_g = [x for p, c in zip(pools, combo, strict=True) if p.gpu == g.index for x in c]
                assert pinned_vram[node.name, g.index] + sum(need[x][0] for x in on_g) <= g.vram - g.reserve
        for g in node.gpus:
            use = next(u for u in r.gpus if (u.node, u.index) == (node.name, g.index))
            pool = next((p for p in pools if p.gpu == g.index), None)
            assert use.pool_bytes == (pool.size_bytes if pool else 0)
            assert use.used_bytes == pinned_vram[node.name, g.index] + use.pool_bytes
        # A llama.cpp pool takes a port, like a pinned llama.cpp replica.
        if node.llamacpp is not None:
            pinned = sum(
                1
                for a in r.assignments
                if a.node == node.name and not a.on_demand and s.model(a.model).runtime.value == "llamacpp"
            )
            llama_pools = sum(1 for p in pools if p.runtime.value == "llamacpp")
            assert pinned + llama_pools <= len(node.llamacpp.ports)
    assert len(r.assignments) + len(r.unplaced) == len(s.models)


@settings(max_examples=40, deadline=None)
@given(pool_clusters())
def test_every_allowed_combination_fits(s: ClusterSpec) -> None:
    profiles = profiles_for(s)
    r = place(s, profiles, params=SolveParams(time_limit=2.0))
    g = greedy_place(s, profiles)
    for result in (r, g):
        check_pools(s, result)
    assert r.objective >= g.objective
    assert r.bound is None or r.bound >= r.objective


@settings(max_examples=15, deadline=None)
@given(pool_clusters())
def test_every_allowed_combination_fits_neighbourhood_search(s: ClusterSpec) -> None:
    profiles = profiles_for(s)
    with neighbourhood_search():
        r = place(s, profiles, params=SolveParams(time_limit=1.0))
    assert r.solver == "cp-sat-lns"
    check_pools(s, r)


def od_spec(node: str, *models: str) -> ClusterSpec:
    return spec(node, "".join(models))


def test_pool_is_the_sum_of_the_max_loaded_largest() -> None:
    """max_loaded 2 on an 11.5 GiB GPU beside a 4 GiB pinned model: the pool holds the members whose two largest
    fit in 7.5 GiB (2, 3 and 4 GiB: 7 GiB); the 5 GiB one goes to the node's CPU pool."""
    node = llama_node("a", ["11.5GiB"]).replace("ports: 3000-3009}", "ports: 3000-3009, max_loaded: 2}")
    s = od_spec(
        node,
        model("p", "4GiB", runtime="llamacpp", extra="    placement: {cpu_offload: false}\n"),
        *(model(f"o{v}", f"{v}GiB", runtime="llamacpp", extra=OD) for v in (2, 3, 4, 5)),
    )
    g = greedy_place(s, profiles_for(s))
    assert g.unplaced == ()
    check_pools(s, g)  # first-fit takes o5 first and leaves two members on the CPU
    for r in (place(s, profiles_for(s), params=PARAMS),):
        assert r.unplaced == ()
        cpu, gpu = r.pools
        assert (cpu.key, cpu.members, cpu.size_bytes, cpu.ram_bytes) == ("a-cpu", ("o5",), 0, 5 * GIB)
        assert (gpu.key, gpu.members, gpu.max_loaded, gpu.size_bytes) == ("a-gpu0", ("o2", "o3", "o4"), 2, 7 * GIB)
        assert r.gpus[0].used_bytes == 11 * GIB and r.gpus[0].pool_bytes == 7 * GIB
        check_pools(s, r)


def test_demand_three_times_the_vram_all_placed() -> None:
    """Two 12 GiB GPUs, 8 GiB pinned, 3 × 24 GiB of on-demand models (max_loaded 1): all placed."""
    nodes = llama_node("a", ["12GiB", "12GiB"], ports="3000-3009")
    models = [model(f"p{i}", "4GiB", runtime="llamacpp") for i in range(2)]
    models += [model(f"o{i}", f"{3 + i % 5}GiB", runtime="llamacpp", extra=OD) for i in range(14)]
    s = od_spec(nodes, *models)
    demand = sum(3 + i % 5 for i in range(14))
    assert demand >= 2 * 24
    first = place(s, profiles_for(s), params=PARAMS)
    for r in (first, greedy_place(s, profiles_for(s))):
        assert r.unplaced == ()
        assert sum(len(p.members) for p in r.pools) == 14
        check_pools(s, r)
    # Same input, same plan.
    assert place(s, profiles_for(s), params=PARAMS) == first


def test_pinned_placed_before_a_higher_priority_on_demand_model() -> None:
    """A pinned model of priority 0 and an on-demand one of priority 100 that cannot both fit: the pinned wins."""
    s = od_spec(
        llama_node("a", ["10GiB"]),
        model("p", "8GiB", runtime="llamacpp", extra="    priority: 0\n    placement: {cpu_offload: false}\n"),
        model("o", "6GiB", runtime="llamacpp", extra=OD + "    priority: 100\n    placement: {cpu_offload: false}\n"),
    )
    for r in (place(s, profiles_for(s), params=PARAMS), greedy_place(s, profiles_for(s))):
        assert [a.model for a in r.assignments] == ["p"]
        (u,) = r.unplaced
        assert u.reason == (
            "o (on-demand) needs 6.0 GiB loaded at 4k context, fully on one GPU;"
            " on a:0 a new pool would need 6.0 GiB and the pinned models leave 2.0 GiB for it"
        )


def test_on_demand_placed_before_gpu_layers() -> None:
    """An on-demand model gets a pool even when a pinned model could have had more GPU layers instead."""
    s = od_spec(
        llama_node("a", ["10GiB"]),
        model("p", "8GiB", runtime="llamacpp", layers=32),
        model("o", "4GiB", runtime="llamacpp", extra=OD + "    placement: {cpu_offload: false}\n"),
    )
    r = place(s, profiles_for(s), params=PARAMS)
    assert r.unplaced == ()
    p = next(a for a in r.assignments if a.model == "p")
    assert p.gpu_layers < p.layers
    assert r.pools[0].members == ("o",)


def test_cpu_pool_when_no_gpu_pool_takes_it() -> None:
    s = od_spec(
        llama_node("a", ["8GiB"], ram="32GiB"),
        model("o1", "6GiB", runtime="llamacpp", extra=OD),
        model("o2", "12GiB", runtime="llamacpp", extra=OD),
    )
    for r in (place(s, profiles_for(s), params=PARAMS), greedy_place(s, profiles_for(s))):
        assert r.unplaced == ()
        assert [(p.key, p.members) for p in r.pools] == [("a-cpu", ("o2",)), ("a-gpu0", ("o1",))]
        cpu = r.pools[0]
        assert cpu.size_bytes == 0 and cpu.ram_bytes == 12 * GIB
        check_pools(s, r)


def test_a_pool_takes_one_port() -> None:
    """Two ports: one pinned replica and one pool of three members; a second pinned model has no port left."""
    s = od_spec(
        llama_node("a", ["24GiB"], ports="3000-3001"),
        model("p1", "2GiB", runtime="llamacpp", extra="    priority: 10\n"),
        model("p2", "2GiB", runtime="llamacpp"),
        *(model(f"o{i}", "2GiB", runtime="llamacpp", extra=OD) for i in range(3)),
    )
    for r in (place(s, profiles_for(s), params=PARAMS), greedy_place(s, profiles_for(s))):
        assert sorted(a.model for a in r.assignments) == ["p1", "p2"]
        assert r.pools == ()  # pinned first: both pinned models take the two ports
        assert r.unplaced[0].reason == (
            "o0 (on-demand) needs 2.0 GiB loaded at 4k context, fully on one GPU; on a:0 a new pool needs a port"
            " and all 2 ports of a's range are taken (pinned replicas and pools)"
        )
    s3 = od_spec(
        llama_node("a", ["24GiB"], ports="3000-3002"),
        model("p1", "2GiB", runtime="llamacpp"),
        model("p2", "2GiB", runtime="llamacpp"),
        *(model(f"o{i}", "2GiB", runtime="llamacpp", extra=OD) for i in range(3)),
    )
    for r in (place(s3, profiles_for(s3), params=PARAMS), greedy_place(s3, profiles_for(s3))):
        assert r.unplaced == ()
        assert [p.members for p in r.pools] == [("o0", "o1", "o2")]


def test_one_runtime_per_gpu_pool() -> None:
    """A node with both runtimes: llama.cpp and Ollama on-demand models never share a GPU's pool."""
    node = ollama_node("a", ["12GiB", "12GiB"]).replace(
        '    ollama: {url: "http://10.0.0.1:11434"}\n',
        '    ollama: {url: "http://10.0.0.1:11434"}\n'
        '    docker: {endpoint: "unix:///var/run/docker.sock"}\n'
        "    llamacpp: {image: llama, ports: 3000-3009}\n",
    )
    s = od_spec(
        node,
        model("l1", "4GiB", runtime="llamacpp", extra=OD),
        model("l2", "4GiB", runtime="llamacpp", extra=OD),
        model("q1", "4GiB", extra=OD),
        model("q2", "4GiB", extra=OD),
    )
    for r in (place(s, profiles_for(s), params=PARAMS), greedy_place(s, profiles_for(s))):
        assert r.unplaced == ()
        assert sorted((p.runtime.value, p.members) for p in r.pools) == [
            ("llamacpp", ("l1", "l2")),
            ("ollama", ("q1", "q2")),
        ]
        check_pools(s, r)


def _current(r: PlacementResult) -> dict[tuple[str, int], CurrentAssignment]:
    return {(a.model, a.replica): CurrentAssignment(a.node, a.gpus, a.gpu_layers) for a in r.assignments}


def test_an_edit_moves_nothing_that_still_fits() -> None:
    """Placed, then run: adding an on-demand model and raising a pinned one's priority moves no one."""
    nodes = llama_node("a", ["12GiB", "12GiB"]) + llama_node("b", ["8GiB"])
    models = [model("p1", "5GiB", runtime="llamacpp"), model("p2", "3GiB", runtime="llamacpp")]
    models += [model(f"o{i}", f"{2 + i}GiB", runtime="llamacpp", extra=OD) for i in range(5)]
    s = od_spec(nodes, *models)
    first = place(s, profiles_for(s), params=PARAMS)
    assert first.unplaced == ()
    edited = od_spec(
        nodes,
        *[m.replace("    memory:", "    priority: 90\n    memory:") if "p2" in m else m for m in models],
        model("o9", "3GiB", runtime="llamacpp", extra=OD),
    )
    again = place(edited, profiles_for(edited), current=_current(first), params=PARAMS)
    assert again.unplaced == () and again.moves == 0
    before = {(a.model, a.node, a.gpus) for a in first.assignments}
    assert before <= {(a.model, a.node, a.gpus) for a in again.assignments}
    check_pools(edited, again)


def test_a_member_that_no_longer_fits_moves_alone() -> None:
    """A member grown past every GPU's room moves to a CPU pool; every other member stays where it is."""
    nodes = llama_node("a", ["10GiB", "10GiB"])
    models = [model("p", "4GiB", runtime="llamacpp", extra="    placement: {node: a, gpus: [0], cpu_offload: false}\n")]
    models += [model(f"o{i}", "3GiB", runtime="llamacpp", extra=OD) for i in range(4)]
    s = od_spec(nodes, *models)
    first = place(s, profiles_for(s), params=PARAMS)
    assert first.unplaced == ()
    mover = "o0"
    # 11 GiB: no GPU takes it now; the node's CPU pool does.
    grown = [m.replace("vram: 3GiB", "vram: 11GiB") if f"name: {mover}\n" in m else m for m in models]
    edited = od_spec(nodes, *grown)
    again = place(edited, profiles_for(edited), current=_current(first), params=PARAMS)
    assert again.unplaced == ()
    assert again.moves == 1
    moved = {a.model for a in again.assignments} - {
        a.model
        for a in again.assignments
        if (a.model, a.node, a.gpus) in {(b.model, b.node, b.gpus) for b in first.assignments}
    }
    assert moved == {mover}
    check_pools(edited, again)


def test_explain_names_the_pool_and_its_numbers() -> None:
    s = od_spec(
        llama_node("a", ["12GiB"]),
        model("p", "4GiB", runtime="llamacpp", extra="    placement: {cpu_offload: false}\n"),
        model("o1", "6GiB", runtime="llamacpp", extra=OD),
        model("o2", "9GiB", runtime="llamacpp", extra=OD + "    placement: {cpu_offload: false}\n"),
    )
    r = place(s, profiles_for(s), params=PARAMS)
    assert [p.members for p in r.pools] == [("o1",)]
    (u,) = r.unplaced
    assert u.reason == (
        "o2 (on-demand) needs 9.0 GiB loaded at 4k context, fully on one GPU; on a:0 its pool"
        " (o1, max_loaded 1) would grow to 9.0 GiB and the pinned models leave 8.0 GiB for it"
    )


def test_a_pinned_model_left_out_is_explained_without_the_pools() -> None:
    """The pinned models come first: a pinned model left out does not fit beside the other pinned ones alone,
    and its reason says so with the room the pool takes counted as free."""
    s = od_spec(
        llama_node("a", ["12GiB"]),
        model("p1", "8GiB", runtime="llamacpp", extra="    priority: 50\n    placement: {cpu_offload: false}\n"),
        model("p2", "6GiB", runtime="llamacpp", extra="    priority: 0\n    placement: {cpu_offload: false}\n"),
        model("o", "3GiB", runtime="llamacpp", extra=OD + "    placement: {cpu_offload: false}\n"),
    )
    r = place(s, profiles_for(s), params=PARAMS)
    assert [a.model for a in r.assignments] == ["o", "p1"]
    (u,) = r.unplaced
    assert u.reason.startswith(
        "p2 needs 6.0 GiB at 4k context (cpu_offload: false, so all layers must be on the GPU);"
        " the largest free GPU it may use (a:0) has 4.0 GiB"
    ), u.reason
