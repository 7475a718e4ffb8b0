"""Property: every placement respects every VRAM and RAM bound, recomputed from the estimator's curves."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st

import solver.place as place_module
from solver.estimate import DEFAULT_GPU_OVERHEAD_BYTES
from solver.place import SolveParams, greedy_place, place
from solver.problem import Assignment, CurrentAssignment, PlacementResult
from solver.profiles import MemoryProfile, declared_curve, declared_split_curve, profiles_for
from specs.model import ClusterSpec
from tests.support.clusters import random_spec

GIB = 1 << 30


@st.composite
def clusters(draw: st.DrawFn) -> ClusterSpec:
    nodes = []
    for i in range(draw(st.integers(1, 3))):
        gpus = [
            {
                "index": j,
                "name": "g",
                "vram": draw(st.sampled_from([4, 8, 12, 24])) * GIB,
                "reserve": draw(st.sampled_from([0, GIB // 2])),
            }
            for j in range(draw(st.integers(0, 2)))
        ]
        nodes.append(
            {
                "name": f"n{i}",
                "tier": "local",
                "address": "h",
                "ram": draw(st.sampled_from([8, 16, 32])) * GIB,
                "ram_reserve": GIB,
                "gpus": gpus,
                "ollama": {"url": "http://h:1"},
            }
        )
    models = []
    for i in range(draw(st.integers(1, 8))):
        layers = draw(st.one_of(st.none(), st.integers(4, 40)))
        models.append(
            {
                "name": f"m{i}",
                "runtime": "ollama",
                "source": {"ollama": f"m{i}"},
                "priority": draw(st.integers(0, 100)),
                "memory": {
                    "vram": draw(st.integers(GIB // 4, 20 * GIB)),
                    "ram": draw(st.integers(0, 2 * GIB)),
                    **({"layers": layers} if layers else {}),
                },
                "placement": {"cpu_offload": draw(st.booleans())},
            }
        )
    return ClusterSpec.model_validate({"cluster": {"name": "p"}, "nodes": nodes, "models": models})


@settings(max_examples=40, deadline=None)
@given(clusters())
def test_bounds_hold(s: ClusterSpec) -> None:
    profiles = profiles_for(s)
    for result in (place(s, profiles, params=SolveParams(time_limit=2.0, workers=1)), greedy_place(s, profiles)):
        vram: dict[tuple[str, int], int] = defaultdict(int)
        ram: dict[str, int] = defaultdict(int)
        for a in result.assignments:
            memory = s.model(a.model).memory
            assert memory is not None
            prof = profiles[a.model]
            assert isinstance(prof, MemoryProfile)
            assert prof.for_node(a.node).layers == declared_curve(memory).layers
            add_single(s, a, vram, ram)
        assert_fits(s, result, vram, ram)


def add_single(s: ClusterSpec, a: Assignment, vram: dict[tuple[str, int], int], ram: dict[str, int]) -> None:
    """Add a one-GPU (or CPU-only) replica's bytes, recomputed from its declared memory outside the solver."""
    m = s.model(a.model)
    assert m.memory is not None
    curve = declared_curve(m.memory)
    if a.gpu_layers:
        assert a.gpus and s.node(a.node).gpus
        vram[a.node, a.gpus[0]] += curve.vram(a.gpu_layers)
    else:
        assert not a.gpus
    ram[a.node] += curve.ram(a.gpu_layers)
    if not m.placement.cpu_offload:
        assert a.gpu_layers == curve.layers + 1


def add_split(s: ClusterSpec, a: Assignment, vram: dict[tuple[str, int], int], ram: dict[str, int]) -> None:
    """Add a split replica's bytes, recomputed from the declared memory outside the solver: blocks per GPU
    in index order, the output layer on the last GPU, a fixed part on every GPU used."""
    m = s.model(a.model)
    assert m.memory is not None
    assert m.placement.split and a.gpu_layers == a.layers
    sc = declared_split_curve(m.memory, DEFAULT_GPU_OVERHEAD_BYTES)
    assert sc is not None
    counts = [a.layers_per_gpu[i] for i in a.gpus]
    assert sum(counts) == a.layers and all(c >= 1 for c in counts[:-1])
    for i, b in zip(a.gpus, sc.devices([*counts[:-1], counts[-1] - 1]), strict=True):
        assert a.vram_bytes[i] == b
        vram[a.node, i] += b
    ram[a.node] += sc.ram_bytes


def assert_fits(s: ClusterSpec, result: PlacementResult, vram: dict[tuple[str, int], int], ram: dict[str, int]) -> None:
    """Every node's RAM and every GPU's VRAM, as recomputed, within bounds; every replica placed or explained."""
    for node in s.nodes:
        assert ram[node.name] <= node.ram - node.ram_reserve
        for g in node.gpus:
            assert vram[node.name, g.index] <= g.vram - g.reserve
    assert len(result.assignments) + len(result.unplaced) == sum(m.replicas for m in s.models)


@settings(max_examples=25, deadline=None)
@given(clusters(), st.sampled_from([0.02, 2.0]))
def test_never_worse_than_greedy_and_bound_holds(s: ClusterSpec, time_limit: float) -> None:
    # Also with a budget too short to prove anything: the plan starts from first-fit's and keeps its value.
    profiles = profiles_for(s)
    r = place(s, profiles, params=SolveParams(time_limit=time_limit, workers=1))
    g = greedy_place(s, profiles)
    assert r.objective >= g.objective
    assert r.bound is None or r.bound >= r.objective
    if r.status == "OPTIMAL":
        assert r.bound == r.objective


@st.composite
def split_clusters(draw: st.DrawFn) -> ClusterSpec:
    """llama.cpp nodes with up to 3 GPUs and models that may be split over them."""
    nodes = []
    for i in range(draw(st.integers(1, 2))):
        gpus = [
            {"index": j, "name": "g", "vram": draw(st.sampled_from([4, 6, 8, 12])) * GIB}
            for j in range(draw(st.integers(1, 3)))
        ]
        nodes.append(
            {
                "name": f"n{i}",
                "tier": "local",
                "address": "h",
                "ram": draw(st.sampled_from([8, 32])) * GIB,
                "ram_reserve": GIB,
                "gpus": gpus,
                "docker": {"endpoint": "unix:///var/run/docker.sock"},
                "llamacpp": {"image": "llama", "ports": "3000-3009"},
            }
        )
    models = [
        {
            "name": f"m{i}",
            "runtime": "llamacpp",
            "source": {"gguf": f"/m/m{i}.gguf"},
            "priority": draw(st.integers(0, 100)),
            "memory": {
                "vram": draw(st.integers(GIB // 2, 24 * GIB)),
                "ram": draw(st.integers(0, 2 * GIB)),
                "layers": draw(st.integers(2, 40)),
            },
            "placement": {"cpu_offload": draw(st.booleans()), "split": draw(st.booleans())},
        }
        for i in range(draw(st.integers(1, 5)))
    ]
    return ClusterSpec.model_validate({"cluster": {"name": "p"}, "nodes": nodes, "models": models})


@settings(max_examples=30, deadline=None)
@given(split_clusters())
def test_split_bounds_hold(s: ClusterSpec) -> None:
    profiles = profiles_for(s)
    r = place(s, profiles, params=SolveParams(time_limit=2.0, workers=1))
    vram: dict[tuple[str, int], int] = defaultdict(int)
    ram: dict[str, int] = defaultdict(int)
    for a in r.assignments:
        if a.split:
            add_split(s, a, vram, ram)
        else:
            add_single(s, a, vram, ram)
    assert_fits(s, r, vram, ram)
    assert r.objective >= greedy_place(s, profiles).objective


# ----------------------------------------------------------------- large clusters (neighbourhood search)


@contextmanager
def neighbourhood_search(max_pairs: int = 6) -> Iterator[None]:
    """Force the large-cluster path on small clusters, with neighbourhoods of a few pairs."""
    with patch.object(place_module, "LNS_MIN_PAIRS", -1), patch.object(place_module, "LNS_MAX_PAIRS", max_pairs):
        yield


@settings(max_examples=30, deadline=None)
@given(st.one_of(clusters(), split_clusters()))
def test_neighbourhood_search_bounds_hold(s: ClusterSpec) -> None:
    profiles = profiles_for(s)
    with neighbourhood_search():
        r = place(s, profiles, params=SolveParams(time_limit=1.0, workers=1))
    assert r.solver == "cp-sat-lns" and r.status == "FEASIBLE"
    vram: dict[tuple[str, int], int] = defaultdict(int)
    ram: dict[str, int] = defaultdict(int)
    for a in r.assignments:
        if a.split:
            add_split(s, a, vram, ram)
        else:
            add_single(s, a, vram, ram)
    assert_fits(s, r, vram, ram)
    assert r.objective >= greedy_place(s, profiles).objective
    # The relaxation's bound holds against the whole model's proven optimum.
    full = place(s, profiles, params=SolveParams(time_limit=2.0, workers=1))
    assert r.bound is not None and r.bound >= r.objective
    if full.status == "OPTIMAL":
        assert r.bound >= full.objective


def test_neighbourhood_search_improves_is_deterministic_and_stable() -> None:
    s = random_spec(40, 8, 4, seed=3)
    profiles = profiles_for(s)
    params = SolveParams(time_limit=2.0, workers=1)
    with neighbourhood_search(max_pairs=120):
        first = place(s, profiles, params=params)
        again = place(s, profiles, params=params)
        assert first.solver == "cp-sat-lns"
        assert first.assignments == again.assignments
        assert first.objective > greedy_place(s, profiles).objective
        # Re-placing a running cluster moves nothing.
        current = {(a.model, a.replica): CurrentAssignment(a.node, a.gpus, a.gpu_layers) for a in first.assignments}
        stays = place(s, profiles, current=current, params=params)
    assert stays.moves == 0
    assert stays.objective >= first.objective
