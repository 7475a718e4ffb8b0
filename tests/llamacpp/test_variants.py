"""Which CPU variant of the project's llama.cpp build a CPU gets, and what the estimator makes of it.

Pure: the variant table below is ggml/src/CMakeLists.txt's x86 list of release b11434 (the one
`tests.support.llamacpp_build` builds); the CPUs are the flag sets of real machines."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from solver.cpu import CpuKind
from tests.support import llamacpp_build as lb
from tests.support.llama_server import exit_reason

CMAKELISTS = """
ggml_add_cpu_backend_variant(x64)
ggml_add_cpu_backend_variant(sse42 SSE42)
ggml_add_cpu_backend_variant(sandybridge SSE42 AVX)
        if (NOT MSVC)
            # __FMA__ and __F16C__ are not defined in MSVC, however they are implied with AVX2/AVX512
ggml_add_cpu_backend_variant(ivybridge SSE42 AVX F16C)
ggml_add_cpu_backend_variant(piledriver SSE42 AVX F16C FMA)
        endif()
ggml_add_cpu_backend_variant(haswell SSE42 AVX F16C FMA AVX2 BMI2)
ggml_add_cpu_backend_variant(skylakex SSE42 AVX F16C FMA AVX2 BMI2 AVX512)
ggml_add_cpu_backend_variant(cannonlake SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI)
ggml_add_cpu_backend_variant(cascadelake SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VNNI)
ggml_add_cpu_backend_variant(icelake SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI AVX512_VNNI)
        if (NOT MSVC)
ggml_add_cpu_backend_variant(cooperlake SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VNNI AVX512_BF16)
ggml_add_cpu_backend_variant(zen4 SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16)
        endif()
ggml_add_cpu_backend_variant(alderlake SSE42 AVX F16C FMA AVX2 BMI2 AVX_VNNI)
        if (NOT MSVC)
ggml_add_cpu_backend_variant(sapphirerapids SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI AVX512_VNNI
    AVX512_BF16 AMX_TILE AMX_INT8)
        endif()
"""
BUILT = ("x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell", "skylakex", "cannonlake",
         "cascadelake", "icelake", "cooperlake", "zen4", "alderlake", "sapphirerapids")  # fmt: skip
VARIANTS = lb.parse_variants(CMAKELISTS, BUILT)

BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt avx f16c fma bmi1 bmi2 avx2"
AVX512 = "avx512f avx512cd avx512vl avx512dq avx512bw"
CPUS = {
    # AMD EPYC (Zen 4): AVX-512 with VNNI and BF16, but no AVX-VNNI (the VEX `vpdpbusd` the old wheel used).
    "epyc-zen4": f"{BASE} {AVX512} avx512vbmi avx512_vnni avx512_bf16 avx512ifma",
    # A Xeon with AMX (Sapphire Rapids).
    "xeon-amx": f"{BASE} {AVX512} avx512vbmi avx512_vnni avx512_bf16 avx_vnni amx_tile amx_int8 amx_bf16",
    # A Xeon under KVM that hides AMX and BF16 (this project's CI machines have been one).
    "xeon-kvm": f"{BASE} {AVX512} avx512vbmi avx512_vnni",
    "alder-lake": f"{BASE} avx_vnni",
    "haswell": BASE,
    "core2": "fpu sse sse2 ssse3",
}


def _flags(cpu: str) -> frozenset[str]:
    return frozenset(CPUS[cpu].split())


def test_the_variant_table_is_read_whole() -> None:
    assert VARIANTS["x64"] == ()
    assert VARIANTS["zen4"][-1] == "AVX512_BF16"
    assert "AMX_INT8" in VARIANTS["sapphirerapids"]
    with pytest.raises(lb.LlamaCppBuildError, match="not in ggml's variant table"):
        lb.parse_variants(CMAKELISTS, ["x64", "power10"])


@pytest.mark.parametrize(
    ("cpu", "variant", "kind"),
    [
        ("epyc-zen4", "zen4", CpuKind.X86_AVX512),
        ("xeon-amx", "sapphirerapids", CpuKind.X86_AMX),
        ("xeon-kvm", "icelake", CpuKind.X86_AVX512),
        ("alder-lake", "alderlake", CpuKind.X86_AVX2),
        ("haswell", "haswell", CpuKind.X86_AVX2),
        ("core2", "x64", CpuKind.PLAIN),
    ],
)
def test_each_cpu_gets_the_variant_ggml_scores_best(cpu: str, variant: str, kind: CpuKind) -> None:
    assert lb.best_variant(VARIANTS, _flags(cpu)) == variant
    assert lb.variant_cpu_kind(VARIANTS[variant]) is kind


def test_no_variant_that_needs_avx_vnni_scores_on_a_zen4() -> None:
    """The crash this build replaces: on a Zen 4 the AVX-VNNI variant (alderlake) scores 0, so it is never loaded."""
    zen4 = _flags("epyc-zen4")
    assert lb.variant_score(VARIANTS["alderlake"], zen4) == 0
    assert lb.variant_score(VARIANTS["sapphirerapids"], zen4) == 0
    assert lb.variant_score(VARIANTS["x64"], zen4) == 1  # the baseline runs anywhere


def test_a_cpu_no_variant_serves_is_a_clear_error(tmp_path: Path) -> None:
    build = lb.LlamaCppBuild(tmp_path, {"haswell": VARIANTS["haswell"]})
    with pytest.raises(lb.LlamaCppBuildError, match=r"none of the llama\.cpp CPU variants"):
        lb.check_runs_here(build, _flags("core2"))
    assert lb.check_runs_here(build, _flags("haswell")) == "haswell"


def test_the_loaded_variant_is_read_from_the_log() -> None:
    log = (
        "load_backend: loaded RPC backend from /app/libggml-rpc.so\n"
        "load_backend: loaded CPU backend from /app/libggml-cpu-zen4.so\n"
    )
    assert lb.loaded_variant(log) == "zen4"
    assert lb.loaded_variant("load_backend: loaded CPU backend from ./libggml-cpu-x64.so") == "x64"
    assert lb.loaded_variant("no such line") is None


def test_an_illegal_instruction_is_named() -> None:
    assert "illegal instruction" in exit_reason(-signal.SIGILL)
    assert "illegal instruction" in exit_reason(132)
    assert exit_reason(1) == "exit 1"
    assert "SIGKILL" in exit_reason(-signal.SIGKILL)


def test_only_variants_copies_the_build_with_one_cpu_backend(tmp_path: Path) -> None:
    src = tmp_path / "build"
    (src / "bin").mkdir(parents=True)
    for name in ("llama-server", "ggml-rpc-server", "libllama.so", "libggml-base.so", "libggml-rpc.so",
                 "libggml-cpu-x64.so", "libggml-cpu-haswell.so"):  # fmt: skip
        (src / "bin" / name).write_text(name)
    build = lb.LlamaCppBuild(src, {"x64": (), "haswell": VARIANTS["haswell"]})
    server = build.only_variants(tmp_path / "only", ["x64"])
    assert server == tmp_path / "only" / "llama-server"
    assert sorted(p.name for p in server.parent.iterdir()) == [
        "ggml-rpc-server", "libggml-base.so", "libggml-cpu-x64.so", "libggml-rpc.so", "libllama.so", "llama-server"
    ]  # fmt: skip
    with pytest.raises(lb.LlamaCppBuildError, match="no CPU variant"):
        build.only_variants(tmp_path / "none", ["zen4"])


def test_the_cache_key_changes_with_the_compiler_and_the_cache_dir_is_outside_the_checkout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert lb.build_key("gcc 12") != lb.build_key("gcc 13")
    monkeypatch.setenv(lb.CACHE_ENV, str(tmp_path))
    assert lb.cache_root() == tmp_path
    monkeypatch.delenv(lb.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lb.cache_root() == tmp_path / "xdg" / "homelab" / "llama.cpp"


def test_a_missing_compiler_names_the_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(lb.LlamaCppBuildError, match="apt-get install -y --no-install-recommends cmake g"):
        lb.ensure()
