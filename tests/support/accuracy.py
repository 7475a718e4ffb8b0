"""Estimate vs llama.cpp: the cases and the comparison shared by the real-server test and the bench.

On a CPU-only machine llama.cpp reports the CPU side of ngl=0: the model buffers
(`CPU_Mapped`, and the extra ones of the CPU backend it runs: `CPU_REPACK`, `AMX`), the
KV cache, the compute buffer and the output buffer. Those are compared with an
estimate for a node without a GPU whose CPU kind is the one of the CPU variant the
server logged it loaded (`served_cpu_kind`): the extra buffers follow what that
variant was compiled for, which on a CPU the build has no exact variant for is less
than everything /proc/cpuinfo lists.

The GPU terms were measured once on a GPU machine (`bench/gpu_memory.py measure`,
recorded in tests/data/gpu-memory/); `gpu_loads` sets the estimate against such a
recording, per offload level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.effects.hostcpu import local_cpu_kind
from solver.cpu import CpuKind
from solver.estimate import EstimateParams, MemoryBreakdown, estimate, shape_from_header
from solver.gguf import read_header
from specs.enums import KVCacheType, LayerOrder
from tests.support import llamacpp_build
from tests.support.llama_server import MIB, ReportedMemory, measure, parse_log
from tests.support.synth import shape_by_name, write_synth_gguf

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


EXTRA_BUFFERS = ("AMX", "CPU_REPACK")
"""The CPU backend's extra weight buffers, by the names llama.cpp logs."""


@dataclass(frozen=True)
class Comparison:
    case: Case
    estimate: MemoryBreakdown
    report: ReportedMemory
    terms: tuple[Term, ...]
    cpu: CpuKind
    extra_estimated: dict[str, int]
    """The estimate's extra weight buffers (AMX, CPU_REPACK) by name, bytes."""

    @property
    def extra_reported(self) -> dict[str, int]:
        return {k: v for k, v in self.report.model.items() if k in EXTRA_BUFFERS}

    @property
    def fit_projected(self) -> Term | None:
        """llama.cpp's own `-fit` projection of host memory against the same measured total (None unless the
        case ran with `fit=True`): what `--fit` would plan with, beside the estimate's `total`."""
        projected = self.report.fit_projected.get("host")
        if projected is None:
            return None
        return Term("fit", projected, self.term("total").reported, "-fit on: projected to use N MiB of host memory")

    @property
    def fit_rows_total(self) -> Term | None:
        """Every row of `-fit`'s dry-run memory breakdown summed (Host plus the extra buffers it lists, e.g. AMX),
        against the measured total; None unless the case ran with `fit=True`."""
        if not self.report.fit_rows:
            return None
        return Term("fit rows", sum(self.report.fit_rows.values()), self.term("total").reported, "-fit breakdown")

    def term(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)

    def misses(self) -> list[str]:
        out = []
        for t in self.terms:
            limit = TOTAL_TOLERANCE if t.name == "total" else WEIGHTS_KV_TOLERANCE
            if t.name in ("weights", "kv", "total") and abs(t.error) > limit:
                out.append(f"{self.case}: {t.name} off by {t.error:+.2%} (limit {limit:.0%})")
        return out


def compare(case: Case, path: Path, report: ReportedMemory, cpu: CpuKind | None = None) -> Comparison:
    """The estimate for a node without a GPU and a `cpu` CPU (default: this machine's) against `report`."""
    kind = local_cpu_kind() if cpu is None else cpu
    shape = shape_from_header(read_header(path))
    params = EstimateParams(ctx=case.ctx, cache_type=case.cache_type, flash_attn=case.flash_attn, gpu=False, cpu=kind)
    b = estimate(shape, 0, params)
    mapped = report.model.get("CPU_Mapped", 0) + report.model.get("CPU", 0)
    repack = sum(report.model.get(k, 0) for k in EXTRA_BUFFERS)
    compute = report.compute.get("CPU", 0)
    output = report.output.get("CPU", 0)
    reported_total = sum(report.model.values()) + report.kv + compute + output
    terms = (
        Term("weights", b.weights_cpu, mapped, "CPU_Mapped model buffer"),
        Term("repack", b.repack_cpu, repack, "AMX + CPU_REPACK model buffers"),
        Term("kv", b.kv_cpu, report.kv, "llama_kv_cache: size (sum)"),
        Term("compute", b.compute_cpu, compute, "CPU compute buffer"),
        Term("output", b.output_cpu, output, "CPU output buffer"),
        Term("total", b.total_cpu, reported_total, "sum of the above"),
    )
    return Comparison(case, b, report, terms, kind, dict(shape.cpu_weights(kind).extra))


def served_cpu_kind(report: ReportedMemory) -> CpuKind:
    """The CPU kind of the backend a server of the project's build logged it loaded (`-lv 4`); for another
    llama-server (one not built with every variant: no such line), this machine's own kind."""
    variant = llamacpp_build.loaded_variant(report.log)
    if variant is None:
        return local_cpu_kind()
    build = llamacpp_build.ensure()
    if variant not in build.variants:
        raise ValueError(f"llama-server loaded a CPU variant {variant!r} that the build does not list")
    return llamacpp_build.variant_cpu_kind(build.variants[variant])


def run_case(case: Case, path: Path, *, repack: bool = True, fit: bool = False) -> Comparison:
    """Load `path` for `case` and compare; `repack=False` runs llama-server with `--no-repack` (no extra
    weight buffers on any CPU: the estimate for a `CpuKind.PLAIN` CPU); `fit=True` runs it with `-fit on`, so
    that llama.cpp's own projection is read too (`Comparison.fit_projected`)."""
    extra = () if repack else ("--no-repack",)
    report = measure(
        path, ctx=case.ctx, cache_type=case.cache_type.value, flash_attn=case.flash_attn, extra_args=extra, fit=fit
    )
    return compare(case, path, report, served_cpu_kind(report) if repack else CpuKind.PLAIN)


# --------------------------------------------------------------------------- on a GPU


@dataclass(frozen=True)
class GpuLoad:
    """One load measured on a GPU machine (bench/gpu_memory.py measure) against its estimate."""

    shape: str
    ctx: int
    cache_type: KVCacheType
    flash_attn: bool
    ngl: int
    estimate: MemoryBreakdown
    report: ReportedMemory
    process_vram: int | None
    """The server's whole VRAM: nvidia-smi memory.used while loaded minus before (MiB resolution)."""

    @property
    def gpu_name(self) -> str:
        names = [k for k in (*self.report.model, *self.report.compute) if k.startswith(("Vulkan", "CUDA"))]
        return next((k for k in names if "Host" not in k), "Vulkan0")

    @property
    def full(self) -> bool:
        return self.ngl == self.estimate.layers + 1

    def reported(self) -> dict[str, int]:
        """The terms llama.cpp logged, by the estimator's names."""
        gpu, r = self.gpu_name, self.report
        out = {
            "weights_gpu": r.model.get(gpu, 0),
            "kv_gpu": r.kv_buffers.get(gpu, 0),
            "compute_gpu": r.compute.get(gpu, 0),
            "weights_cpu": r.model.get("CPU_Mapped", 0) + r.model.get("CPU", 0),
            "kv_cpu": r.kv_buffers.get("CPU", 0),
            "compute_cpu": sum(v for k, v in r.compute.items() if k != gpu),
        }
        out["buffers_gpu"] = out["weights_gpu"] + out["kv_gpu"] + out["compute_gpu"]
        return out

    def estimated(self) -> dict[str, int]:
        b = self.estimate
        return {
            "weights_gpu": b.weights_gpu,
            "kv_gpu": b.kv_gpu,
            "compute_gpu": b.compute_gpu,
            "weights_cpu": b.weights_cpu,
            "kv_cpu": b.kv_cpu,
            "compute_cpu": b.compute_cpu,
            "buffers_gpu": b.weights_gpu + b.kv_gpu + b.compute_gpu,
        }

    def error(self, term: str) -> float:
        est, rep = self.estimated()[term], self.reported()[term]
        if rep == 0:
            return 0.0 if est == 0 else float("inf")
        return (est - rep) / rep


def gpu_loads(data: Mapping[str, Any], workdir: Path) -> list[GpuLoad]:
    """Estimate every load of a `bench/gpu_memory.py measure` file (writing the synthetic GGUFs to `workdir`)."""
    out: list[GpuLoad] = []
    for r in data["records"]:
        if "error" in r:
            continue
        path = workdir / f"{r['shape']}.gguf"
        if not path.exists():
            write_synth_gguf(path, shape_by_name(r["shape"]))
        shape = shape_from_header(read_header(path))
        cache = KVCacheType(r["cache"])
        params = EstimateParams(ctx=r["ctx"], cache_type=cache, flash_attn=r["fa"], layer_order=LayerOrder.OUTPUT_FIRST)
        process = None
        if r.get("loaded_mib") is not None and r.get("before_mib") is not None:
            process = (r["loaded_mib"] - r["before_mib"]) * MIB
        out.append(
            GpuLoad(
                shape=r["shape"],
                ctx=r["ctx"],
                cache_type=cache,
                flash_attn=r["fa"],
                ngl=r["ngl"],
                estimate=estimate(shape, r["ngl"], params),
                report=parse_log("\n".join(r["lines"])),
                process_vram=process,
            )
        )
    return out
