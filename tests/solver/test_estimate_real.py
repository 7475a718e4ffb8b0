"""The estimator against a real llama-server (the project's llama.cpp build, CPU here).

Each case loads a real GGUF (Gemma 3 270M, or a synthetic llama) into
llama-server with `-lv 4`, stops it once loaded, and compares the estimate for a
node without a GPU with the buffers llama.cpp reports: weights and KV within 1%,
the total within 5%. The GPU terms cannot be measured on this machine.

The extra weight buffers depend on the CPU backend that runs (an AMX buffer where the
AMX variant loads, CPU_REPACK where an AVX2 or AVX-512 variant loads, none with the
baseline): the expected buffers are the estimate for the CPU kind of the variant the
server logged it loaded (`accuracy.served_cpu_kind`), and must be exactly the ones
llama.cpp reports, each to the log's 0.01 MiB.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.effects.hostcpu import local_cpu_flags, local_cpu_kind
from solver.cpu import CpuKind
from tests.support import llamacpp_build
from tests.support.accuracy import CASES, GEMMA, Case, run_case
from tests.support.llama_server import LlamaServerError, find_binary
from tests.support.synth import SynthShape


@pytest.fixture(scope="module", autouse=True)
def _llama_server_built() -> None:
    try:
        find_binary()  # the project's build, made once per machine
    except LlamaServerError as exc:
        pytest.fail(str(exc))


def test_this_cpu_is_known() -> None:
    """The expectations follow the variant this CPU loads, so its flags must be readable."""
    assert local_cpu_flags(), "no CPU flags in /proc/cpuinfo"
    assert local_cpu_kind() is not CpuKind.UNKNOWN


def test_the_served_kind_is_the_loaded_variants(gemma_file: Path) -> None:
    """The estimate is made for the variant that really runs: the best of the build for this CPU."""
    result = run_case(CASES[0], gemma_file)
    build = llamacpp_build.ensure()
    variant = llamacpp_build.loaded_variant(result.report.log)
    assert variant is not None and variant == llamacpp_build.best_variant(build.variants, local_cpu_flags())
    assert result.cpu is llamacpp_build.variant_cpu_kind(build.variants[variant])
    if result.cpu is CpuKind.X86_AMX:
        assert "AMX" in result.report.model
    else:
        assert "AMX" not in result.report.model


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.model}-{c.ctx}-{c.cache_type.value}-fa{int(c.flash_attn)}")
def test_estimate_matches_llama_cpp(
    case: Case, gemma_file: Path, synth_files: dict[str, tuple[SynthShape, Path]]
) -> None:
    path = gemma_file if case.model == GEMMA else synth_files[case.model][1]
    result = run_case(case, path)
    weights, repack, kv, total = (result.term(n) for n in ("weights", "repack", "kv", "total"))
    assert abs(weights.error) <= 0.01, weights
    assert abs(kv.error) <= 0.01, kv
    # The extra buffers of this CPU (AMX, CPU_REPACK), each exact to the log's 0.01 MiB.
    assert result.extra_estimated.keys() == result.extra_reported.keys(), (result.cpu, result.report.model)
    for name, size in result.extra_estimated.items():
        assert abs(size - result.extra_reported[name]) <= 8 * 1024, (result.cpu, name, size, result.report.model)
    assert abs(repack.estimated - repack.reported) <= 16 * 1024, repack
    assert abs(total.error) <= 0.05, total


@pytest.mark.parametrize("case", [CASES[0], Case("mqa-mixed", 512)], ids=lambda c: f"{c.model}-{c.ctx}")
def test_without_repack_every_weight_stays_mapped(
    case: Case, gemma_file: Path, synth_files: dict[str, tuple[SynthShape, Path]]
) -> None:
    """`--no-repack` turns the extra buffers off on any CPU: the estimate for a plain CPU holds."""
    path = gemma_file if case.model == GEMMA else synth_files[case.model][1]
    result = run_case(case, path, repack=False)
    assert result.extra_reported == {} and result.extra_estimated == {}, result.report.model
    assert abs(result.term("weights").error) <= 0.01, result.term("weights")
    assert abs(result.term("total").error) <= 0.05, result.term("total")


def test_fit_projection_is_read_beside_the_measurement(synth_files: dict[str, tuple[SynthShape, Path]]) -> None:
    """`-fit on` (what the bench's `--fit` columns read): llama.cpp's dry-run breakdown lists this CPU's extra
    weight buffers as rows of their own beside `Host`, and its "host memory" projection is the `Host` row alone:
    below the measured total by at least those buffers."""
    case = Case("gqa-q8", 512)
    result = run_case(case, synth_files[case.model][1], fit=True)
    rows = result.report.fit_rows
    assert "no changes needed" in result.report.log  # -fit changed nothing in the load measured
    assert set(rows) - {"Host"} == set(result.extra_reported), (rows, result.report.model)
    projected, summed = result.fit_projected, result.fit_rows_total
    assert projected is not None and summed is not None
    assert projected.estimated == rows["Host"]
    extra = sum(result.extra_reported.values())
    assert summed.estimated <= projected.estimated + extra + 2**20  # whole MiB per row
    assert projected.reported - projected.estimated >= extra, projected  # the extra buffers are not in it
    assert abs(result.term("total").error) <= 0.05  # the same load, measured as without -fit
