"""First-fit decreasing: its order and first-fit choice, and CP-SAT never doing worse."""

from __future__ import annotations

from solver.place import SolveParams, greedy_place, place
from solver.profiles import profiles_for
from tests.solver.placecases import model, ollama_node, spec

GIB = 1 << 30


def test_first_fit_by_priority_then_size() -> None:
    no_cpu = "    placement: {cpu_offload: false}\n"
    s = spec(
        ollama_node("n", ["10GiB", "6GiB"]),
        model("a", "6GiB", extra=no_cpu + "    priority: 50\n")
        + model("b", "5GiB", extra=no_cpu + "    priority: 60\n")
        + model("c", "4GiB", extra=no_cpu + "    priority: 50\n"),
    )
    r = greedy_place(s, profiles_for(s))
    # b (60) first → GPU 0; then a (50, bigger) → GPU 1 (GPU 0 has 5 left); c → GPU 0.
    assert {a.model: a.gpus for a in r.assignments} == {"b": (0,), "a": (1,), "c": (0,)}
    assert r.solver == "greedy"


def test_greedy_misses_what_cp_sat_finds() -> None:
    # Greedy puts the 60-priority 6 GiB model first and then fits nothing else; CP-SAT places two.
    no_cpu = "    placement: {cpu_offload: false}\n"
    s = spec(
        ollama_node("n", ["10GiB"]),
        model("big", "6GiB", extra=no_cpu + "    priority: 60\n")
        + model("x", "5GiB", extra=no_cpu + "    priority: 50\n")
        + model("y", "5GiB", extra=no_cpu + "    priority: 50\n"),
    )
    g = greedy_place(s, profiles_for(s))
    c = place(s, profiles_for(s), params=SolveParams(time_limit=5.0, workers=1))
    assert [a.model for a in g.assignments] == ["big"]
    assert sorted(a.model for a in c.assignments) == ["x", "y"]
    assert c.objective > g.objective


def test_keep_current_puts_replicas_back_first() -> None:
    from solver.greedy import greedy_assign
    from solver.problem import CurrentAssignment, build_problem

    s = spec(ollama_node("n", ["10GiB", "10GiB"]), model("a", "4GiB") + model("b", "4GiB"))
    cur = {("a", 0): CurrentAssignment("n", (1,)), ("b", 0): CurrentAssignment("n", ())}
    p = build_problem(s, profiles_for(s), current=cur)
    plain = {ch.key[0]: ch.gpu for ch in greedy_assign(p)}
    kept = {ch.key[0]: (ch.gpu, ch.ngl) for ch in greedy_assign(p, keep_current=True)}
    assert plain == {"a": 0, "b": 0}
    assert kept == {"a": (1, 1), "b": (None, 0)}
