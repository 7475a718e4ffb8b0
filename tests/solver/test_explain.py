"""Explanations with numbers for models whose profile comes from a GGUF header (context alternatives)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from solver.estimate import layer_curve, shape_from_header
from solver.explain import GIB, ctx_text, gib
from solver.gguf import GGUFHeader, read_header
from solver.place import SolveParams, place
from solver.profiles import MemoryProfile, params_for, profiles_for
from specs.model import ClusterSpec
from tests.solver.placecases import llama_node, spec
from tests.support.synth import SynthShape

PARAMS = SolveParams(time_limit=2.0, workers=1)


def gguf_model(name: str, context: int, extra: str = "") -> str:
    return f"""  - name: {name}
    runtime: llamacpp
    source: {{gguf: /m/{name}.gguf}}
    context: {context}
{extra}"""


def _reader(path: Path) -> Callable[[str], GGUFHeader]:
    def read(_: str) -> GGUFHeader:
        return read_header(path)

    return read


def _full_vram(s: ClusterSpec, path: Path, ctx: int) -> tuple[int, int]:
    """(VRAM at full offload, L+1) of the model at `ctx` on node box, from the estimator."""
    shape = shape_from_header(read_header(path), "m")
    params = params_for(s.model("m").model_copy(update={"context": ctx}), s.node("box"))
    curve = layer_curve(shape, params)
    return curve.vram(curve.layers + 1), curve.layers + 1


def test_unplaced_gguf_model_gets_smaller_context(synth_files: dict[str, tuple[SynthShape, Path]]) -> None:
    _, path = synth_files["gqa-f16"]
    probe = spec(llama_node("box", ["1GiB"]), gguf_model("m", 32768))
    need32, _ = _full_vram(probe, path, 32768)
    need8, _ = _full_vram(probe, path, 8192)
    need16, _ = _full_vram(probe, path, 16384)
    assert need8 < need16 < need32
    # A GPU between the 8k and the 16k need: the model fits fully at 8k, and not at 32k.
    cap = (need8 + need16) // 2
    s = spec(llama_node("box", [str(cap)]), gguf_model("m", 32768, "    placement: {cpu_offload: false}\n"))
    profiles = profiles_for(s, read_header=_reader(path))
    assert isinstance(profiles["m"], MemoryProfile) and profiles["m"].source == "gguf"
    r = place(s, profiles, params=PARAMS)
    assert not r.assignments
    [u] = r.unplaced
    assert u.reason == (
        f"m needs {gib(need32)} at 32k context (cpu_offload: false, so all layers must be on the GPU);"
        f" the largest free GPU it may use (box:0) has {gib(cap)}; it fits fully at {ctx_text(8192)} context"
    )


def test_partly_offloaded_gguf_model_note(synth_files: dict[str, tuple[SynthShape, Path]]) -> None:
    _, path = synth_files["gqa-f16"]
    probe = spec(llama_node("box", ["1GiB"]), gguf_model("m", 32768))
    need32, top = _full_vram(probe, path, 32768)
    need8, _ = _full_vram(probe, path, 8192)
    need16, _ = _full_vram(probe, path, 16384)
    cap = (need8 + need16) // 2
    s = spec(llama_node("box", [str(cap)]), gguf_model("m", 32768))
    r = place(s, profiles_for(s, read_header=_reader(path)), params=PARAMS)
    [a] = r.assignments
    assert 0 < a.gpu_layers < top
    assert a.vram_bytes[0] <= cap
    [note] = r.notes
    assert note == (
        f"m has {a.gpu_layers} of {top} layers on GPU box:0: full offload needs {gib(need32)} at 32k context"
        f" and the GPU has {gib(cap)} for it besides the other models; it fits fully at 8k context"
    )


def test_gib_says_mib_where_a_tenth_of_a_gib_would_read_zero() -> None:
    assert gib(0) == "0.0 GiB"
    assert gib(17 << 20) == "17.0 MiB"
    assert gib(2 * GIB) == "2.0 GiB"
    assert gib(GIB // 10) == "0.1 GiB"
