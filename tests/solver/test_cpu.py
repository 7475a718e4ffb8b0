"""The CPU backend's extra weight buffers per kind of CPU, /proc/cpuinfo flags, and the RAM a node's CPU costs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T

from controller.effects.hostcpu import local_cpu_flags, local_cpu_kind
from solver.cpu import (
    KIND_FLAGS,
    CpuKind,
    CpuWeights,
    Weight,
    amx_bytes,
    cpu_flags,
    cpu_kind,
    cpu_weights,
    kind_flags,
    repack_bytes,
)
from solver.estimate import EstimateParams, estimate, shape_from_header
from solver.gguf import GGUFHeader, read_header, tensor_nbytes
from solver.profiles import MemoryProfile, node_cpu_kind, profiles_for
from specs.errors import SpecError
from tests.solver.placecases import spec
from tests.support.synth import SynthShape

MIB = 1 << 20

XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu
"""
EPYC = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma avx512f avx512bw avx512_vnni\n"
HASWELL = "flags : fpu sse avx avx2 fma\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm aes asimddp sve i8mm bf16\n"
PI4 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        (XEON_AMX, CpuKind.X86_AMX),
        (EPYC, CpuKind.X86_AVX512),
        (HASWELL, CpuKind.X86_AVX2),
        (GRAVITON3, CpuKind.ARM_I8MM),
        (PI4, CpuKind.ARM_NEON),
        ("flags : fpu sse sse2\n", CpuKind.PLAIN),
    ],
)
def test_kind_from_cpuinfo(text: str, kind: CpuKind) -> None:
    assert cpu_kind(cpu_flags(text)) is kind
    # `homelab discover` writes only the flags that decide: they decide the same kind.
    assert cpu_kind(kind_flags(cpu_flags(text))) is kind
    assert set(kind_flags(cpu_flags(text))) <= set(KIND_FLAGS)


def test_flags_are_the_first_processors() -> None:
    flags = cpu_flags(XEON_AMX)
    assert "amx_int8" in flags and "bugs" not in flags and "spectre_v1" not in flags
    assert cpu_flags("model name : x\n") == frozenset()
    assert cpu_kind(["AVX2"]) is CpuKind.X86_AVX2  # spec flags in any case


def test_this_machines_cpu(tmp_path: Path) -> None:
    assert local_cpu_kind() is cpu_kind(local_cpu_flags())
    (tmp_path / "cpuinfo").write_text(XEON_AMX)
    assert local_cpu_kind(tmp_path / "cpuinfo") is CpuKind.X86_AMX
    assert local_cpu_kind(tmp_path / "missing") is CpuKind.UNKNOWN


def _w(t: T, k: int, n: int, matmul: bool = True, offset: int | None = None) -> Weight:
    return Weight(t, (k, n), tensor_nbytes(t, (k, n)), matmul, offset)


@pytest.mark.parametrize(
    ("w", "expected"),
    [
        # Q8_0: 34-byte blocks + 4 bytes of compensation per block
        (_w(T.Q8_0, 512, 1408), 1408 * 16 * 38),
        # Q4_K: 144-byte blocks + 4 bytes of scales
        (_w(T.Q4_K, 2048, 640), 640 * 8 * 148),
        (_w(T.Q6_K, 2048, 640), 640 * 8 * 210),
        (_w(T.F16, 256, 768), 256 * 768 * 2),
        (_w(T.F16, 200, 1024), None),  # a row of 200 is not a multiple of 16
        (_w(T.Q8_0, 512, 40), None),  # 40 output rows: not pairs of 16-row tiles
        (_w(T.Q5_0, 512, 512), None),  # no AMX kernel
        (_w(T.F16, 256, 768, matmul=False), None),  # token_embd: get_rows
    ],
)
def test_amx_buffer_rules(w: Weight, expected: int | None) -> None:
    assert amx_bytes(w) == expected


def test_repack_rules_per_cpu() -> None:
    q4k = _w(T.Q4_K, 2048, 640)
    assert repack_bytes(CpuKind.X86_AVX2, q4k) == q4k.n_bytes
    assert repack_bytes(CpuKind.PLAIN, q4k) is None
    assert repack_bytes(CpuKind.X86_AVX2, _w(T.Q4_K, 2048, 644)) is None  # rows % 8
    q2k = _w(T.Q2_K, 256, 64)
    assert repack_bytes(CpuKind.X86_AVX2, q2k) is None and repack_bytes(CpuKind.X86_AVX512, q2k) == q2k.n_bytes
    q8 = _w(T.Q8_0, 512, 512)
    assert repack_bytes(CpuKind.X86_AVX512, q8) is None
    assert repack_bytes(CpuKind.ARM_DOTPROD, q8) == q8.n_bytes
    assert repack_bytes(CpuKind.ARM_NEON, q8) is None


def test_mapped_buffer_is_the_file_span_of_what_stays() -> None:
    # embd (mapped) | Q8_0 matrix (AMX) | F32 norm (mapped) | Q8_0 output (AMX) at the end of the file
    embd = _w(T.F16, 256, 100, matmul=False, offset=0)
    mid = _w(T.Q8_0, 256, 64, offset=embd.n_bytes)
    norm = Weight(T.F32, (256,), 1024, False, mid.offset + mid.n_bytes if mid.offset is not None else None)
    assert norm.offset is not None
    out = _w(T.Q8_0, 256, 64, offset=norm.offset + 1024)
    amx = cpu_weights(CpuKind.X86_AMX, [embd, mid, norm, out])
    # the matrix between two mapped tensors still counts in the span; the output at the end does not
    assert amx.mapped == embd.n_bytes + mid.n_bytes + 1024
    assert amx.extra == {"AMX": 2 * 64 * 8 * 38}
    plain = cpu_weights(CpuKind.PLAIN, [embd, mid, norm, out])
    assert plain == CpuWeights(embd.n_bytes + 2 * mid.n_bytes + 1024, {})


def test_gemma_buffers_per_cpu(gemma_file: Path) -> None:
    """Gemma 3 270M Q4_K_M, as llama-server 0.10434.0 logged it on an AMX Xeon and on an AVX-512 EPYC."""
    shape = shape_from_header(read_header(gemma_file))
    amx, avx512 = shape.cpu_weights(CpuKind.X86_AMX), shape.cpu_weights(CpuKind.X86_AVX512)
    assert round(amx.mapped / MIB, 2) == 235.16 and round(amx.extra["AMX"] / MIB, 2) == 213.91
    assert set(amx.extra) == {"AMX"}  # AMX takes every Q4_K tensor the repack buffer would have taken
    assert round(avx512.mapped / MIB, 2) == 235.16 and round(avx512.extra["CPU_REPACK"] / MIB, 2) == 12.66
    assert shape.cpu_weights(CpuKind.PLAIN).extra == {}
    assert shape.cpu_weights(CpuKind.UNKNOWN) == amx  # the most RAM of any kind
    params = EstimateParams(ctx=1024, gpu=False, cpu=CpuKind.X86_AMX)
    assert estimate(shape, 0, params).repack_cpu == amx.extra_total
    # with a GPU in use the host buffer takes the weights: no extra copies at any offload level
    assert estimate(shape, 3, EstimateParams(ctx=1024, cpu=CpuKind.X86_AMX)).repack_cpu == 0


def _reader(path: Path) -> Callable[[str], GGUFHeader]:
    return lambda _: read_header(path)


def _nodes(features: str) -> str:
    cpu = f"    cpu: {{features: [{features}]}}\n" if features else ""
    return f"""  - name: nas
    tier: cpu
    address: 10.0.0.3
    ram: 16GiB
{cpu}    docker: {{endpoint: "unix:///var/run/docker.sock"}}
    llamacpp: {{image: llama, ports: 3000-3009}}
"""


MODEL = """  - name: m
    runtime: llamacpp
    source: {gguf: /m/m.gguf}
    context: 1024
"""


@pytest.mark.parametrize(
    ("features", "kind"),
    [("avx2, avx512f, avx512_vnni, amx_int8", CpuKind.X86_AMX), ("avx2", CpuKind.X86_AVX2), ("", CpuKind.UNKNOWN)],
)
def test_profile_ram_follows_the_nodes_cpu(gemma_file: Path, features: str, kind: CpuKind) -> None:
    s = spec(_nodes(features), MODEL)
    assert node_cpu_kind(s.node("nas")) is kind
    profile = profiles_for(s, read_header=_reader(gemma_file))["m"]
    assert isinstance(profile, MemoryProfile)
    shape = shape_from_header(read_header(gemma_file))
    expected = estimate(shape, 0, EstimateParams(ctx=1024, gpu=False, cpu=kind)).total_cpu
    assert profile.for_node("nas").ram(0) == expected
    assert (
        expected - shape.cpu_weights(kind).extra_total
        == estimate(shape, 0, EstimateParams(ctx=1024, gpu=False, cpu=CpuKind.PLAIN)).total_cpu
    )


def test_spec_cpu_features_are_checked() -> None:
    with pytest.raises(SpecError, match="is not a CPU flag"):
        spec(_nodes('"amx int8"'), MODEL)


def test_q8_synth_buffers(synth_files: dict[str, tuple[SynthShape, Path]]) -> None:
    """Q8_0 synthetic models: the AMX buffer takes every matrix, the x86 repack buffer none."""
    shape = shape_from_header(read_header(synth_files["mha-q8"][1]))
    assert round(shape.cpu_weights(CpuKind.X86_AMX).extra["AMX"] / MIB, 2) == 33.84
    assert shape.cpu_weights(CpuKind.X86_AVX512).extra == {}
