"""GPU memory of a real llama-server against the estimate (needs a machine with an NVIDIA GPU to measure).

    python bench/gpu_memory.py measure --out DIR    # on the GPU machine: loads, logs, nvidia-smi
    python bench/gpu_memory.py compare FILE.json    # anywhere: estimate vs what was measured

`measure` writes synthetic llama GGUFs (tests.support.synth; the five shapes of
the CPU accuracy bench plus a 16-layer, 32k-vocabulary one), loads each into
llama-server (`-fit off --no-warmup -lv 4`, default `-np 4`) at several `-ngl`
levels, and while the model is loaded reads `nvidia-smi`: the GPU's
memory.used (against a reading with no server running) and the compute-apps
list. It writes DIR/gpu_memory.json (per load: the memory lines of the log and
the nvidia-smi figures) and the raw nvidia-smi answers to the two queries
`controller.drivers.gpu` makes, taken while a server held the GPU. It imports
nothing beyond the standard library, numpy and gguf, so it runs on a bare GPU
machine.

`compare` regenerates the same GGUF headers and sets the estimate (layer order
output-first, as this llama.cpp logs "offloading output layer to GPU" first)
against each load: GPU weights, GPU KV, GPU compute buffer, the CPU side, and
the process's whole VRAM as nvidia-smi saw it (memory.used while loaded minus
before; the estimator's total_gpu includes its per-process overhead term).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for tests.support

from tests.support.llama_server import MIB, measure
from tests.support.synth import LARGER, SHAPES, write_synth_gguf

ALL_SHAPES = (*SHAPES, LARGER)
QUERY_GPU = [
    "nvidia-smi",
    "--query-gpu=index,name,uuid,memory.total,memory.used,memory.free,driver_version,pci.bus_id",
    "--format=csv,noheader,nounits",
]
QUERY_APPS = [
    "nvidia-smi",
    "--query-compute-apps=pid,process_name,used_memory,gpu_uuid",
    "--format=csv,noheader,nounits",
]
"""The two queries of `controller.drivers.gpu` (not imported: this script runs where homelab isn't installed)."""
_KEEP = ("buffer size", "offload", "llama_kv_cache: size", "ggml_vulkan:", "n_seq_max", "n_ctx")


def _cases() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in ALL_SHAPES:
        n = s.n_layer
        for ngl in sorted({0, 1, 2, n // 2, n, n + 1}):
            out.append({"shape": s.name, "ctx": 4096, "cache": "f16", "fa": True, "ngl": ngl})
    out += [
        {"shape": LARGER.name, "ctx": 16384, "cache": "f16", "fa": True, "ngl": 9},
        {"shape": LARGER.name, "ctx": 16384, "cache": "f16", "fa": True, "ngl": 17},
        {"shape": LARGER.name, "ctx": 16384, "cache": "q8_0", "fa": True, "ngl": 17},
        {"shape": LARGER.name, "ctx": 16384, "cache": "f16", "fa": False, "ngl": 17},
        {"shape": LARGER.name, "ctx": 16384, "cache": "f16", "fa": False, "ngl": 9},
        {"shape": "gqa-q8", "ctx": 2048, "cache": "q4_0", "fa": True, "ngl": 7},
        {"shape": "mqa-mixed", "ctx": 2048, "cache": "f16", "fa": False, "ngl": 4},
    ]
    return out


def _smi(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"error: {e}"


def _used_mib() -> int | None:
    text = _smi(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]).strip()
    return int(text.splitlines()[0]) if text[:1].isdigit() else None


def cmd_measure(out: Path, binary: str | None, threads: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    shapes = {s.name: s for s in ALL_SHAPES}
    captured = False
    gpu = _smi(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]).strip()
    with tempfile.TemporaryDirectory(prefix="homelab-gpumem-") as tmp:
        for case in _cases():
            path = Path(tmp) / f"{case['shape']}.gguf"
            if not path.exists():
                write_synth_gguf(path, shapes[case["shape"]])
            seen: dict[str, Any] = {"before_mib": _used_mib()}

            def loaded(pid: int, seen: dict[str, Any] = seen, ngl: int = case["ngl"]) -> None:
                nonlocal captured
                time.sleep(0.5)
                seen["loaded_mib"] = _used_mib()
                seen["apps"] = _smi(QUERY_APPS)
                seen["pid"] = pid
                if ngl > 0 and not captured:
                    (out / "smi-gpu.csv").write_text(_smi(QUERY_GPU))
                    (out / "smi-apps.csv").write_text(seen["apps"])
                    captured = True

            t = time.monotonic()
            try:
                rep = measure(
                    path,
                    ctx=case["ctx"],
                    cache_type=case["cache"],
                    flash_attn=case["fa"],
                    ngl=case["ngl"],
                    binary=binary,
                    threads=threads,
                    while_loaded=loaded,
                )
                lines = [ln for ln in rep.log.splitlines() if any(k in ln for k in _KEEP)]
                if not (out / "sample.log").exists() and case["ngl"] > 0:
                    (out / "sample.log").write_text(rep.log[-2_000_000:])
                rec = {**case, **seen, "lines": lines, "seconds": round(time.monotonic() - t, 2)}
            except Exception as e:  # a failed load is recorded, the others still run
                rec = {**case, **seen, "error": str(e)[-2000:]}
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k not in ("lines", "apps")}), flush=True)
            doc = {"binary": binary or "llama-server (the project's build)", "gpu": gpu, "records": records}
            (out / "gpu_memory.json").write_text(json.dumps(doc, indent=1))
            gpu_buffer = any("model buffer size" in ln and "CPU" not in ln for ln in rec.get("lines", []))
            if case["ngl"] > 0 and not gpu_buffer:
                print("no GPU model buffer in the log: llama-server found no GPU; stopping", file=sys.stderr)
                return 1
    return 0


def _fmt(est: int, rep: int | None) -> str:
    if rep is None:
        return f"{est / MIB:.1f}/-"
    if rep == 0:
        return f"{est / MIB:.1f}/0.0" + ("" if est == 0 else " (rep 0)")
    return f"{est / MIB:.1f}/{rep / MIB:.1f} {100 * (est - rep) / rep:+.1f}%"


TERMS = ("weights_gpu", "kv_gpu", "compute_gpu", "weights_cpu", "kv_cpu", "compute_cpu", "buffers_gpu")
HEADS = ("GPU weights", "GPU KV", "GPU compute", "CPU weights", "CPU KV", "host compute", "GPU buffers")


def cmd_compare(path: Path, overhead_mib: int) -> int:
    from rich.console import Console
    from rich.table import Table

    from tests.support.accuracy import gpu_loads

    data = json.loads(path.read_text())
    with tempfile.TemporaryDirectory(prefix="homelab-gpumem-") as tmp:
        loads = gpu_loads(data, Path(tmp))
    table = Table(
        title=f"Estimate vs {data['binary']} on {data.get('gpu', 'a GPU')}: estimated/reported MiB and error",
        padding=(0, 1),
    )
    for col in ("model", "ctx", "KV", "FA", "ngl", *HEADS, f"VRAM (+{overhead_mib} MiB) vs nvidia-smi"):
        table.add_column(col, justify="left" if col in ("model", "KV") else "right", no_wrap=True)
    for ld in loads:
        est, rep = ld.estimated(), ld.reported()
        vram = est["buffers_gpu"] + overhead_mib * MIB
        table.add_row(
            ld.shape,
            str(ld.ctx),
            ld.cache_type.value,
            "on" if ld.flash_attn else "off",
            str(ld.ngl),
            *(_fmt(est[t], rep[t]) for t in TERMS),
            _fmt(vram, ld.process_vram),
        )
    console = Console(width=260)
    console.print(table)
    over = [(ld.process_vram - ld.reported()["buffers_gpu"]) / MIB for ld in loads if ld.process_vram is not None]
    if over:
        console.print(
            f"per-process VRAM beyond llama.cpp's buffers (nvidia-smi memory.used while loaded, minus before, minus"
            f" the logged GPU buffers): {min(over):.1f} to {max(over):.1f} MiB over {len(over)} loads"
        )
    for term, head in zip(TERMS, HEADS, strict=True):
        errs = [ld.error(term) for ld in loads if ld.reported()[term]]
        full = [ld.error(term) for ld in loads if ld.full and ld.reported()[term]]
        worst, worst_full = max(errs, key=abs, default=0.0), max(full, key=abs, default=0.0)
        console.print(f"{head:>13}: worst {worst:+.2%} over all levels, {worst_full:+.2%} at full offload")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument(
        "--binary",
        default=None,
        help="a llama-server with a GPU backend (a CUDA or Vulkan build of llama.cpp); the project's own build "
        "(tests/support/llamacpp_build.py, the default) has CPU backends only and offloads nothing",
    )
    m.add_argument("--threads", type=int, default=4)
    c = sub.add_parser("compare")
    c.add_argument("file", type=Path)
    c.add_argument(
        "--overhead-mib", type=int, default=64, help="the per-process GPU overhead to add (the node's gpu_overhead)"
    )
    args = ap.parse_args()
    if args.cmd == "measure":
        return cmd_measure(args.out, args.binary, args.threads)
    return cmd_compare(args.file, args.overhead_mib)


if __name__ == "__main__":
    sys.exit(main())
