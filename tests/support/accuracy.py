"""Estimate vs llama.cpp: the cases and the comparison shared by the real-server test and the bench.

On a CPU-only machine llama.cpp reports the CPU side of ngl=0: the model buffers
(`CPU_Mapped`, and `CPU_REPACK` on x86), the KV cache, the compute buffer and the
output buffer. Those are compared with an estimate for a node without a GPU; the
GPU terms (weights/KV/compute on the GPU, the CUDA overhead) cannot be measured
here and are not in the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from solver.estimate import EstimateParams, MemoryBreakdown, estimate, shape_from_header
from solver.gguf import read_header
from specs.enums import KVCacheType
from tests.support.llama_server import ReportedMemory, measure

WEIGHTS_KV_TOLERANCE = 0.01
TOTAL_TOLERANCE = 0.05
GEMMA = "gemma3-270m"


@dataclass(frozen=True)
class Case:
    model: str
    """A synth shape name, or GEMMA."""
    ctx: int
    cache_type: KVCacheType = KVCacheType.F16
    flash_attn: bool = True


CASES: tuple[Case, ...] = (
    Case(GEMMA, 1024),
    Case(GEMMA, 4096),
    Case(GEMMA, 16384),
    *(Case(m, c) for m in ("mha-f16", "gqa-f16", "mha-q8", "gqa-q8", "mqa-mixed") for c in (512, 4096)),
    Case(GEMMA, 4096, KVCacheType.Q8_0),
    Case(GEMMA, 4096, flash_attn=False),
    Case("gqa-q8", 2048, KVCacheType.Q4_0),
    Case("mqa-mixed", 2048, flash_attn=False),
)


@dataclass(frozen=True)
class Term:
    name: str
    estimated: int
    reported: int
    measured_as: str

    @property
    def error(self) -> float:
        if self.reported == 0:
            return 0.0 if self.estimated == 0 else float("inf")
        return (self.estimated - self.reported) / self.reported


@dataclass(frozen=True)
class Comparison:
    case: Case
    estimate: MemoryBreakdown
    report: ReportedMemory
    terms: tuple[Term, ...]

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)

    def misses(self) -> list[str]:
        out = []
        for t in self.terms:
            limit = TOTAL_TOLERANCE if t.name == "total" else WEIGHTS_KV_TOLERANCE
            if t.name in ("weights", "kv", "total") and abs(t.error) > limit:
                out.append(f"{self.case}: {t.name} off by {t.error:+.2%} (limit {limit:.0%})")
        return out


def compare(case: Case, path: Path, report: ReportedMemory) -> Comparison:
    shape = shape_from_header(read_header(path))
    params = EstimateParams(ctx=case.ctx, cache_type=case.cache_type, flash_attn=case.flash_attn, gpu=False)
    b = estimate(shape, 0, params)
    mapped = report.model.get("CPU_Mapped", 0) + report.model.get("CPU", 0)
    repack = report.model.get("CPU_REPACK", 0)
    compute = report.compute.get("CPU", 0)
    output = report.output.get("CPU", 0)
    reported_total = sum(report.model.values()) + report.kv + compute + output
    terms = (
        Term("weights", b.weights_cpu, mapped, "CPU_Mapped model buffer"),
        Term("repack", b.repack_cpu, repack, "CPU_REPACK model buffer"),
        Term("kv", b.kv_cpu, report.kv, "llama_kv_cache: size (sum)"),
        Term("compute", b.compute_cpu, compute, "CPU compute buffer"),
        Term("output", b.output_cpu, output, "CPU output buffer"),
        Term("total", b.total_cpu, reported_total, "sum of the above"),
    )
    return Comparison(case, b, report, terms)


def run_case(case: Case, path: Path) -> Comparison:
    report = measure(path, ctx=case.ctx, cache_type=case.cache_type.value, flash_attn=case.flash_attn)
    return compare(case, path, report)
