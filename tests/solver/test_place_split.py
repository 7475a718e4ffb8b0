"""Placement over several GPUs of one node (`placement.split: true`, llama.cpp `--tensor-split`)."""

from __future__ import annotations

from pathlib import Path

from solver.estimate import DEFAULT_GPU_OVERHEAD_BYTES, EstimateParams, estimate_split, tensor_split_for
from solver.gguf import GGUFHeader, read_header
from solver.place import SolveParams, greedy_place, place
from solver.problem import CurrentAssignment, PlacementResult
from solver.profiles import MemoryProfile, declared_split_curve, profiles_for
from specs.model import ClusterSpec
from tests.solver.placecases import llama_node, model, ollama_node, spec
from tests.support.synth import SynthShape

GIB = 1 << 30
MIB = 1 << 20
PARAMS = SolveParams(time_limit=5.0, workers=1, seed=0)
SPLIT = "    placement: {cpu_offload: false, split: true}\n"
NO_SPLIT = "    placement: {cpu_offload: false}\n"


def solve(s: ClusterSpec, **kw: object) -> PlacementResult:
    return place(s, profiles_for(s), params=PARAMS, **kw)  # type: ignore[arg-type]


def big(extra: str, vram: str = "12GiB") -> str:
    return model("big", vram, runtime="llamacpp", layers=20, extra=extra)


def blocks_of(layers_per_gpu: dict[int, int]) -> list[int]:
    """Blocks per GPU in index order (the output layer is counted on the last GPU)."""
    counts = [layers_per_gpu[i] for i in sorted(layers_per_gpu)]
    return [*counts[:-1], counts[-1] - 1]


def test_too_big_for_one_gpu_is_split() -> None:
    s = spec(llama_node("n", ["8GiB", "8GiB"]), big(SPLIT))
    r = solve(s)
    assert r.status == "OPTIMAL"
    assert not r.unplaced
    [a] = r.assignments
    assert a.gpus == (0, 1)
    assert a.gpu_layers == a.layers == 21
    assert sum(a.layers_per_gpu.values()) == 21
    assert all(n >= 1 for n in a.layers_per_gpu.values())
    # Recomputed outside the solver from the declared memory: the overhead on each GPU besides its layers.
    m = s.model("big")
    assert m.memory is not None
    sc = declared_split_curve(m.memory, DEFAULT_GPU_OVERHEAD_BYTES)
    assert sc is not None
    expected = sc.devices(blocks_of(dict(a.layers_per_gpu)))
    assert tuple(a.vram_bytes[i] for i in a.gpus) == expected
    assert sum(expected) == 12 * GIB + DEFAULT_GPU_OVERHEAD_BYTES
    for g in r.gpus:
        assert g.used_bytes == a.vram_bytes[g.index] <= g.capacity_bytes
    assert a.to_json()["layers_per_gpu"] == {str(i): n for i, n in sorted(a.layers_per_gpu.items())}


def test_not_split_without_split_true() -> None:
    r = solve(spec(llama_node("n", ["8GiB", "8GiB"]), big(NO_SPLIT)))
    assert not r.assignments
    [u] = r.unplaced
    assert "needs 12.0 GiB" in u.reason and "split" not in u.reason


def test_split_only_when_one_gpu_is_not_enough() -> None:
    # It fits whole on the 16 GiB GPU: one GPU, no second compute buffer and overhead.
    r = solve(spec(llama_node("n", ["8GiB", "16GiB"]), big(SPLIT)))
    [a] = r.assignments
    assert a.gpus == (1,)
    assert not a.layers_per_gpu
    assert "layers_per_gpu" not in a.to_json()


def test_split_beats_partial_offload() -> None:
    # With CPU offload allowed, one GPU would take it partly; the split keeps every layer on a GPU.
    r = solve(spec(llama_node("n", ["8GiB", "8GiB"]), big("    placement: {split: true}\n")))
    [a] = r.assignments
    assert a.gpus == (0, 1) and a.gpu_layers == 21


def test_split_too_big_even_for_both_is_explained() -> None:
    r = solve(spec(llama_node("n", ["8GiB", "8GiB"]), big(SPLIT, vram="16GiB")))
    assert not r.assignments
    [u] = r.unplaced
    # 16 GiB + a second 768 MiB fixed part = 16.75 GiB against 16 GiB.
    assert DEFAULT_GPU_OVERHEAD_BYTES == 768 * MIB
    assert "split over n's GPUs it needs at least 16.8 GiB in all (0.8 GiB on every GPU it uses" in u.reason
    assert "its 2 GPUs have 16.0 GiB free together" in u.reason


def test_split_shares_gpus_with_other_models() -> None:
    # 12 GiB + 0.75 GiB split, next to a 2.5 GiB model: 15.25 of 16 GiB, each GPU within its bound.
    s = spec(
        llama_node("n", ["8GiB", "8GiB"]),
        big(SPLIT) + model("small", "2.5GiB", runtime="llamacpp", layers=10, extra=NO_SPLIT),
    )
    r = solve(s)
    assert not r.unplaced
    for g in r.gpus:
        assert g.used_bytes == sum(a.vram_bytes.get(g.index, 0) for a in r.assignments)
        assert g.used_bytes <= g.capacity_bytes


def test_pinned_gpus() -> None:
    s = spec(
        llama_node("n", ["8GiB", "8GiB", "8GiB"]),
        big("    placement: {cpu_offload: false, split: true, node: n, gpus: [0, 2]}\n"),
    )
    [a] = solve(s).assignments
    assert a.gpus == (0, 2)


def test_three_gpus_when_two_are_not_enough() -> None:
    s = spec(llama_node("n", ["6GiB", "6GiB", "6GiB"]), big(SPLIT, vram="14GiB"))
    [a] = solve(s).assignments
    assert a.gpus == (0, 1, 2)
    assert sum(a.layers_per_gpu.values()) == 21


def test_ollama_models_are_not_split() -> None:
    # Homelab cannot tell Ollama how to split, so `split` applies to llama.cpp models.
    s = spec(ollama_node("n", ["8GiB", "8GiB"]), model("big", "12GiB", layers=20, extra=SPLIT))
    r = solve(s)
    assert not r.assignments


def test_deterministic() -> None:
    s = spec(
        llama_node("n", ["8GiB", "8GiB", "6GiB"]),
        big(SPLIT) + "".join(model(f"m{i}", f"{2 + i}GiB", runtime="llamacpp", layers=12) for i in range(3)),
    )
    first = solve(s).to_json()
    for _ in range(2):
        assert solve(s).to_json() == first


def test_current_split_stays() -> None:
    s = spec(llama_node("n", ["8GiB", "8GiB", "8GiB"]), big(SPLIT))
    for gpus in ((0, 1), (1, 2), (0, 2)):
        r = solve(s, current={("big", 0): CurrentAssignment("n", gpus, 21)})
        [a] = r.assignments
        assert a.gpus == gpus
        assert r.moves == 0


def test_never_worse_than_greedy_which_does_not_split() -> None:
    s = spec(llama_node("n", ["8GiB", "8GiB"]), big(SPLIT))
    assert not greedy_place(s, profiles_for(s)).assignments
    assert solve(s).objective > greedy_place(s, profiles_for(s)).objective


def test_gguf_split_matches_the_estimator(tmp_path: Path) -> None:
    from tests.support.synth import write_synth_gguf

    shape = SynthShape("split", n_layer=8, n_embd=512, n_head=8, n_head_kv=2, n_ff=1536, n_vocab=4096)
    path = write_synth_gguf(tmp_path / "split.gguf", shape)
    header = read_header(path)
    s = spec(
        llama_node("n", ["866MiB", "866MiB"]),
        f"""  - name: syn
    runtime: llamacpp
    source: {{gguf: {path}}}
    context: 8192
    placement: {{cpu_offload: false, split: true}}
""",
    )

    def read(p: str) -> GGUFHeader:
        assert p == str(path)
        return header

    profiles = profiles_for(s, read_header=read)
    prof = profiles["syn"]
    assert isinstance(prof, MemoryProfile) and prof.shape is not None
    # Full offload on one GPU needs 869 MiB; split, 849-865 MiB on each of two 866 MiB GPUs.
    params = EstimateParams(ctx=8192)
    assert prof.for_node("n").vram(9) > 866 * MIB
    r = place(s, profiles, params=PARAMS)
    [a] = r.assignments
    assert a.gpus == (0, 1)
    est = estimate_split(prof.shape, params, tensor_split_for(blocks_of(dict(a.layers_per_gpu))))
    assert tuple(a.vram_bytes[i] for i in a.gpus) == est.vram
    assert all(v <= 866 * MIB for v in est.vram)
    assert a.ram_bytes == est.ram_bytes
