"""Placement by CP-SAT: exact small cases, hard constraints, explanations, determinism, stability."""

from __future__ import annotations

import pytest

from solver.estimate import LayerCurve
from solver.place import SolveParams, place
from solver.problem import CurrentAssignment, PlacementResult
from solver.profiles import NoEstimate, profiles_for
from specs.enums import LayerOrder
from specs.model import ClusterSpec
from tests.solver.placecases import llama_node, model, ollama_node, spec

GIB = 1 << 30
MIB = 1 << 20
PARAMS = SolveParams(time_limit=5.0, workers=1, seed=0)


def solve(s: ClusterSpec, **kw: object) -> PlacementResult:
    return place(s, profiles_for(s), params=PARAMS, **kw)  # type: ignore[arg-type]


def where(r: PlacementResult) -> dict[str, tuple[str, tuple[int, ...], int]]:
    return {a.model: (a.node, a.gpus, a.gpu_layers) for a in r.assignments}


def test_knapsack_by_priority() -> None:
    # 10 GiB GPU, no CPU fallback: b (60) + c (40) = 102 beats a (50) + c (40) = 92.
    no_cpu = "    placement: {cpu_offload: false}\n"
    s = spec(
        ollama_node("n", ["10GiB"]),
        model("a", "6GiB", extra=no_cpu + "    priority: 50\n")
        + model("b", "5GiB", extra=no_cpu + "    priority: 60\n")
        + model("c", "4GiB", extra=no_cpu + "    priority: 40\n"),
    )
    r = solve(s)
    assert r.status == "OPTIMAL"
    assert sorted(where(r)) == ["b", "c"]
    [u] = r.unplaced
    assert u.model == "a"
    assert "needs 6.0 GiB at 4k context" in u.reason
    assert "(cpu_offload: false" in u.reason
    assert "has 1.0 GiB" in u.reason
    assert r.gpus[0].used_bytes == 9 * GIB


def test_partial_offload_hand_computed() -> None:
    # 10 blocks + output, 11 GiB declared: fixed 512 MiB, 977.45 MiB a layer; 8 GiB fits 512 + 7·977.45.
    s = spec(ollama_node("n", ["8GiB"]), model("m", "11GiB", layers=10))
    r = solve(s)
    [a] = r.assignments
    assert (a.gpu_layers, a.layers) == (7, 11)
    assert a.vram_bytes[0] <= 8 * GIB
    [note] = r.notes
    assert "m has 7 of 11 layers on GPU n:0: full offload needs 11.0 GiB" in note


def test_cpu_only_node_and_runtime_and_pins() -> None:
    s = spec(
        ollama_node("desk", ["24GiB"], tier="local")
        + llama_node("box", ["24GiB", "24GiB"], tier="remote")
        + ollama_node("nas", [], tier="cpu"),
        model("o", "4GiB", layers=20)
        + model("l", "4GiB", runtime="llamacpp", layers=20, extra="    placement: {node: box, gpus: [1]}\n")
        + model("small", "1GiB", extra="    placement: {tier: cpu}\n")
        + model("cpu", "2GiB", extra="    placement: {cpu_only: true, node: desk}\n"),
    )
    r = solve(s)
    w = where(r)
    assert w["o"] == ("desk", (0,), 21)
    assert w["l"] == ("box", (1,), 21)
    assert w["small"] == ("nas", (), 0)
    assert w["cpu"] == ("desk", (), 0)
    assert next(a for a in r.assignments if a.model == "cpu").ram_bytes == 2 * GIB
    assert not r.unplaced


def test_runtime_keeps_ollama_off_a_llamacpp_node() -> None:
    s = spec(
        ollama_node("desk", ["4GiB"]) + llama_node("box", ["24GiB"]),
        model("o", "6GiB", extra="    placement: {cpu_offload: false}\n"),
    )
    r = solve(s)
    assert not r.assignments
    [u] = r.unplaced
    assert "largest free GPU it may use (desk:0) has 4.0 GiB" in u.reason


def test_min_gpu_layers() -> None:
    s = spec(
        ollama_node("a", ["8GiB"]) + ollama_node("b", ["8GiB"]),
        model("m", "11GiB", layers=10, extra="    placement: {min_gpu_layers: 8}\n"),
    )
    r = solve(s)
    # 8 layers need 512 + 8·977.45 MiB > 8 GiB: no GPU takes it, and it may not go to the CPU.
    assert not r.assignments
    [u] = r.unplaced
    assert "min_gpu_layers: 8" in u.reason
    assert "with 7 of 11 layers" not in u.reason


def test_anti_affinity() -> None:
    # Both replicas would fit on a's GPU; b's GPU is too small: the second replica stays unplaced.
    s = spec(
        ollama_node("a", ["24GiB"]) + ollama_node("b", ["1GiB"]),
        model("m", "4GiB", extra="    replicas: 2\n    placement: {cpu_offload: false}\n"),
    )
    r = solve(s)
    assert [(a.node, a.replica) for a in r.assignments] == [("a", 0)]
    [u] = r.unplaced
    assert u.replica == 1
    assert "largest free GPU it may use (b:0) has 1.0 GiB" in u.reason


def test_ports_bound_replicas_per_node() -> None:
    s = spec(
        llama_node("box", ["24GiB"], ports="3000-3001"),
        model("a", "1GiB", runtime="llamacpp", extra="    priority: 90\n")
        + model("b", "1GiB", runtime="llamacpp", extra="    priority: 80\n")
        + model("c", "1GiB", runtime="llamacpp", extra="    priority: 10\n"),
    )
    r = solve(s)
    assert sorted(where(r)) == ["a", "b"]
    assert [u.model for u in r.unplaced] == ["c"]


def test_fixed_port_unique_per_node() -> None:
    s = spec(
        llama_node("box", ["24GiB"]),
        model("a", "1GiB", runtime="llamacpp", extra="    port: 3005\n    priority: 60\n")
        + model("b", "1GiB", runtime="llamacpp", extra="    port: 3005\n"),
    )
    assert sorted(where(solve(s))) == ["a"]


def test_foreign_vram_and_reserve() -> None:
    s = spec(ollama_node("n", ["10GiB"]), model("m", "6GiB", extra="    placement: {cpu_offload: false}\n"))
    assert where(solve(s))
    r = place(s, profiles_for(s), foreign_vram={("n", 0): 5 * GIB}, params=PARAMS)
    assert not r.assignments
    assert "has 5.0 GiB" in r.unplaced[0].reason


def test_no_estimate() -> None:
    s = spec(ollama_node("n", ["10GiB"]), model("m", "1GiB"))
    r = place(s, {"m": NoEstimate()}, params=PARAMS)
    assert r.unplaced[0].reason == "m: no memory estimate: GGUF not readable here and no `memory:` declared"


def test_layer_curve_profile_with_regimes() -> None:
    # Partial offload costs an extra 1 GiB compute buffer: 4 blocks of 1 GiB, output 1 GiB.
    curve = LayerCurve(
        layers=4,
        layer_order=LayerOrder.OUTPUT_FIRST,
        gpu_per_block=(GIB,) * 4,
        cpu_per_block=(GIB,) * 4,
        gpu_fixed=(0, 3 * GIB, GIB),
        cpu_fixed=(6 * GIB, 5 * GIB, 5 * GIB),
    )
    # Full: 1 + 4 = 5 GiB. Partial ngl=k: 3 + (k-1) GiB. 5 GiB card: full (5). 4.5 GiB card: ngl 2 (4 GiB).
    s = spec(ollama_node("n", ["5GiB"]), model("m", "1GiB"))
    assert where(place(s, {"m": curve}, params=PARAMS))["m"] == ("n", (0,), 5)
    s2 = spec(ollama_node("n", ["4.5GiB"]), model("m", "1GiB"))
    r2 = place(s2, {"m": curve}, params=PARAMS)
    assert where(r2)["m"] == ("n", (0,), 2)
    assert r2.assignments[0].vram_bytes[0] == 4 * GIB


def test_deterministic() -> None:
    s = spec(
        ollama_node("a", ["8GiB", "8GiB"]) + ollama_node("b", ["12GiB"]),
        "".join(model(f"m{i}", f"{1 + i % 5}GiB", layers=20 + i) for i in range(12)),
    )
    for workers in (1, 2):
        p = SolveParams(time_limit=5.0, workers=workers, seed=0)
        first = place(s, profiles_for(s), params=p)
        assert all(place(s, profiles_for(s), params=p) == first for _ in range(3))


def test_stability_keeps_current() -> None:
    s = spec(ollama_node("n", ["10GiB", "10GiB"]), model("m", "2GiB"))
    for gpu in (0, 1):
        r = solve(s, current={("m", 0): CurrentAssignment("n", (gpu,))})
        assert where(r)["m"] == ("n", (gpu,), 1)
        assert r.moves == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_example_places_everything(examples_dir: object, seed: int) -> None:
    from pathlib import Path

    from specs import load_spec

    s = load_spec(Path(str(examples_dir)) / "homelab.yaml").spec
    r = place(s, profiles_for(s), params=SolveParams(time_limit=5.0, workers=1, seed=seed))
    assert not r.unplaced
    for g in r.gpus:
        assert g.used_bytes <= g.capacity_bytes


def test_optimal_means_bound_reached() -> None:
    s = spec(
        ollama_node("a", ["8GiB", "8GiB"]) + ollama_node("b", ["12GiB"]),
        "".join(model(f"m{i}", f"{1 + i % 5}GiB", layers=20 + i) for i in range(6)),
    )
    r = solve(s)
    assert r.status == "OPTIMAL"
    assert r.bound == r.objective
    assert r.gap == 0.0


def test_current_on_several_gpus_counts_as_a_move() -> None:
    # Without split a replica gets one GPU, so a replica running on two cannot stay as it is.
    s = spec(ollama_node("n", ["10GiB", "10GiB"]), model("m", "2GiB"))
    r = solve(s, current={("m", 0): CurrentAssignment("n", (0, 1))})
    assert where(r)["m"][:2] in (("n", (0,)), ("n", (1,)))
    assert r.moves == 1


def test_stability_starts_from_current() -> None:
    # Greedy alone would put the big model first on GPU 0; the current plan has it on GPU 1, and it stays.
    s = spec(
        ollama_node("n", ["12GiB", "12GiB"]),
        model("big", "8GiB", layers=20, extra="    priority: 90\n") + model("small", "3GiB", layers=20),
    )
    cur = {("big", 0): CurrentAssignment("n", (1,)), ("small", 0): CurrentAssignment("n", (0,))}
    r = solve(s, current=cur)
    assert where(r) == {"big": ("n", (1,), 21), "small": ("n", (0,), 21)}
    assert r.moves == 0


def test_running_models_are_not_moved_for_more_layers() -> None:
    # Fresh, the big model takes the 12 GiB GPU fully and the small one the 6 GiB GPU.
    s = spec(
        ollama_node("n", ["12GiB", "6GiB"]),
        model("big", "10GiB", layers=30) + model("small", "5GiB", layers=20),
    )
    fresh = solve(s)
    assert where(fresh) == {"big": ("n", (0,), 31), "small": ("n", (1,), 21)}
    # Running the other way round still fits (big partly offloaded, as it is now): both stay as they are.
    big_now = 15
    cur = {
        ("big", 0): CurrentAssignment("n", (1,), big_now),
        ("small", 0): CurrentAssignment("n", (0,), 21),
    }
    kept = solve(s, current=cur)
    assert kept.moves == 0
    assert where(kept) == {"big": ("n", (1,), big_now), "small": ("n", (0,), 21)}
    assert kept.objective < fresh.objective  # the layers it gives up for stability


def test_a_move_that_places_another_model_is_made() -> None:
    # "small" runs on the 12 GiB GPU; "big" (10 GiB, no CPU offload) fits only there: small moves.
    s = spec(
        ollama_node("n", ["12GiB", "6GiB"]),
        model("big", "10GiB", layers=30, extra="    placement: {cpu_offload: false}\n")
        + model("small", "5GiB", layers=20),
    )
    r = solve(s, current={("small", 0): CurrentAssignment("n", (0,), 21)})
    # Keeping small on GPU 0 would cut its layers (a restart all the same), so it moves, with all its layers.
    assert where(r) == {"big": ("n", (0,), 31), "small": ("n", (1,), 21)}
    assert r.moves == 1


@pytest.mark.parametrize(("k", "seed"), [(10, 0), (10, 1), (10, 2), (20, 0), (20, 1), (20, 2)])
def test_triplets_packed_perfectly(k: int, seed: int) -> None:
    # Falkenauer-style triplets: 3k models, each between a quarter and half a GPU, filling k GPUs
    # exactly. First-fit decreasing leaves models out; the default solve places every one, each GPU full.
    from solver.place import greedy_place
    from tests.support.clusters import TRIPLET_CAPACITY, triplet_spec

    s = triplet_spec(k, seed)
    assert greedy_place(s, profiles_for(s)).unplaced, "the instance must be hard for first-fit"
    r = place(s, profiles_for(s), params=SolveParams())
    assert not r.unplaced
    assert len(r.assignments) == 3 * k
    assert len(r.gpus) == k
    for g in r.gpus:
        assert g.used_bytes <= g.capacity_bytes
        assert g.used_bytes >= TRIPLET_CAPACITY * MIB - (1 << 16)


@pytest.mark.parametrize(("k", "seed"), [(20, 0), (20, 1), (20, 2), (40, 0), (40, 1), (40, 2)])
def test_exact_fill_packs_triplets(k: int, seed: int) -> None:
    # The heuristic alone (solver.fill): every model on one of the k GPUs, each GPU filled to the unit,
    # and the same plan again for the same input.
    from solver.fill import exact_fill
    from solver.problem import build_problem, units_down
    from tests.support.clusters import triplet_spec

    s = triplet_spec(k, seed)
    problem = build_problem(s, profiles_for(s))
    plan = exact_fill(problem)
    assert len(plan) == 3 * k
    assert all(ch.gpu is not None and ch.ngl == 1 for ch in plan)  # full offload (a memory-only model: 1 layer)
    used = [0] * k
    reps = {r.key: r for r in problem.replicas}
    for ch in plan:
        assert ch.gpu is not None
        used[ch.gpu] += reps[ch.key].needs[ch.node].v_full
    assert used == [units_down(g.capacity) for g in problem.gpus]
    assert exact_fill(problem) == plan


def test_triplets_packed_stay_packed() -> None:
    # A perfect packing placed again, and again without one model: nothing moves (the start is kept
    # even where CP-SAT's presolve would lose it as a hint).
    from tests.support.clusters import triplet_spec

    s = triplet_spec(20, 0)
    r = place(s, profiles_for(s), params=SolveParams())
    assert not r.unplaced
    current = {(a.model, a.replica): CurrentAssignment(a.node, a.gpus, a.gpu_layers) for a in r.assignments}
    again = place(s, profiles_for(s), current=current, params=SolveParams())
    assert again.moves == 0 and not again.unplaced
    fewer = s.model_copy(update={"models": s.models[1:]})
    kept = {k: c for k, c in current.items() if k[0] != s.models[0].name}
    r2 = place(fewer, profiles_for(fewer), current=kept, params=SolveParams())
    assert r2.moves == 0 and not r2.unplaced


def test_exact_fill_keeps_the_hard_rules() -> None:
    # Two 4 GiB replicas of one model and a 4 GiB model fill an 8 GiB GPU exactly in pairs, but replicas
    # of one model go to different nodes, and the llama.cpp node has one port: every plan keeps both rules.
    from solver.fill import exact_fill
    from solver.problem import build_problem

    no_cpu = "    placement: {cpu_offload: false}\n"
    s = spec(
        llama_node("a", ["8GiB"], ports="3000-3000") + llama_node("b", ["8GiB"], ports="3000-3000"),
        model("m", "4GiB", runtime="llamacpp", extra=no_cpu + "    replicas: 2\n")
        + model("o", "4GiB", runtime="llamacpp", extra=no_cpu),
    )
    problem = build_problem(s, profiles_for(s))
    plan = exact_fill(problem)
    nodes = [ch.node for ch in plan]
    assert len(nodes) == len(set(nodes)), "one port per node: one llama.cpp model each"
    assert len(plan) == 2
    r = solve(s)
    assert len(r.assignments) == 2
    assert len({a.node for a in r.assignments if a.model == "m"}) == len([a for a in r.assignments if a.model == "m"])
