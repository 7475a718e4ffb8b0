#!/usr/bin/env python3
"""GPU memory of a CUDA llama.cpp process, per load, in bench/gpu_memory.py's JSON format.

    OUT=DIR python3 bench/cudaprobe/measure.py [--probe BIN] [--prompt 2048] [--budget S] [--cpu-ok]

Runs the cases of bench/gpu_memory.py's `_cases()` (same synthetic GGUFs, same ctx/cache/FA/ngl) with
bench/cudaprobe/probe instead of llama-server. Per case: nvidia-smi memory.used before; start the probe; wait
for `PROBE READY` (model + context created; no warmup, like `llama-server --no-warmup`); sleep 0.5 s;
memory.used and the compute-apps list (`loaded_mib`, `apps`). Then, unless --prompt 0, two more
readings of the same process: after llama-server's warmup decode (BOS+EOS: `warm_mib`, `warm_apps`) and
after decoding a prompt of min(--prompt, ctx-16) tokens, n_batch 2048 / n_ubatch 512 (`decoded_mib`,
`decoded_apps`): what the CUDA pools and cuBLAS add once the server has served a request. In the first
--init-cases cases also one reading before anything is loaded (`init_mib`, `init_apps`: the bare CUDA
context). `*_proc_mib` is the probe's own line of the compute-apps list (None where nvidia-smi lists no
processes, e.g. in a container); `probe_lines` has the probe's own cudaMemGetInfo per stage.

Writes OUT/cuda_memory.json after every case (readable by `python bench/gpu_memory.py compare`),
OUT/cuda_sample.log (the whole log of the first ngl>0 case) and OUT/smi-gpu.csv. Stops with exit 1
if the first ngl>0 load logs no `CUDA0 model buffer` (no GPU used), unless --cpu-ok.
Needs only the standard library, numpy and gguf (the wheel beside this file is put on sys.path).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
try:
    import yaml  # type: ignore[import-untyped]  # noqa: F401
except ImportError:  # gguf.metadata imports yaml at import time; writing a GGUF never uses it
    sys.modules["yaml"] = types.ModuleType("yaml")
try:
    import gguf  # noqa: F401
except ImportError:
    wheels = sorted(HERE.glob("gguf-*.whl")) + sorted((ROOT / ".devcarry").glob("gguf-*.whl"))
    if not wheels:
        sys.exit("measure.py: gguf is not installed and no gguf-*.whl beside this file")
    sys.path.insert(1, str(wheels[0]))

_spec = importlib.util.spec_from_file_location("bench_gpu_memory", ROOT / "bench" / "gpu_memory.py")
assert _spec and _spec.loader
gm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gm)  # stdlib + numpy + gguf only (tests.support.synth, tests.support.llama_server)

from tests.support.llama_server import parse_log  # noqa: E402
from tests.support.synth import write_synth_gguf  # noqa: E402

DEFAULT_PROBE = "/tmp/cudaprobe/build-cuda-ON/bin/probe"


def _proc_mib(apps: str, pid: int) -> int | None:
    for line in apps.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[0] == str(pid) and parts[2].isdigit():
            return int(parts[2])
    return None


def _read(seen: dict[str, Any], key: str, pid: int) -> None:
    seen[f"{key}_mib"] = gm._used_mib()
    apps = gm._smi(gm.QUERY_APPS)
    seen["apps" if key == "loaded" else f"{key}_apps"] = apps
    seen[f"{key}_proc_mib"] = _proc_mib(apps, pid)


def _wait_for(log_path: Path, marker: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with open(log_path, "rb") as f:
        tail = b""
        while True:
            tail = (tail + f.read())[-4096:]
            if marker.encode() in tail:
                return
            if proc.poll() is not None:
                text = log_path.read_text(errors="replace")
                raise RuntimeError(f"probe exited with {proc.returncode} before {marker!r}:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {marker!r} in {timeout_s} s:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.02)


def _send(proc: subprocess.Popen[bytes], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(f"{line}\n".encode())
    proc.stdin.flush()


def _read_at(
    seen: dict[str, Any],
    key: str,
    marker: str,
    proc: subprocess.Popen[bytes],
    log_path: Path,
    timeout_s: float,
    settle_s: float,
) -> None:
    """Wait for the probe's `marker`, let the driver settle, read nvidia-smi into seen[key_*]."""
    _wait_for(log_path, marker, proc, timeout_s)
    time.sleep(settle_s)
    _read(seen, key, proc.pid)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            assert proc.stdin is not None
            proc.stdin.close()  # the probe frees everything and exits on EOF
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(timeout=10)


def _prioritised(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same cases, the most telling first (so that a --budget cut loses partial-offload levels, not these):
    the 16-layer shape and the extra ctx/cache/FA cases, then each shape's full offload and ngl 0, then the rest."""
    n_layer = {s.name: s.n_layer for s in gm.ALL_SHAPES}
    large = gm.LARGER.name

    def rank(c: dict[str, Any]) -> int:
        extra = c["ctx"] != 4096 or c["cache"] != "f16" or not c["fa"]
        if c["shape"] == large and (extra or c["ngl"] == n_layer[large] + 1):
            return 0
        if extra:
            return 1
        if c["ngl"] == n_layer[c["shape"]] + 1:
            return 2
        if c["ngl"] == 0:
            return 3
        return 4

    return sorted(cases, key=rank)  # stable: _cases() order within a rank


def run_case(
    probe: str, model: Path, case: dict[str, Any], args: argparse.Namespace, log_path: Path, pause_init: bool
) -> dict[str, Any]:
    seen: dict[str, Any] = {"before_mib": gm._used_mib()}
    cmd = [
        probe,
        str(model),
        str(case["ngl"]),
        str(case["ctx"]),
        case["cache"],
        "on" if case["fa"] else "off",
        str(args.n_seq_max),
        str(args.n_ubatch),
        str(args.n_batch),
    ]
    env = {**os.environ, "PROBE_THREADS": str(args.threads)}
    if pause_init:
        env["PROBE_PAUSE_INIT"] = "1"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env)
    seen["pid"] = proc.pid
    try:
        if pause_init:  # the bare process: CUDA context (+ ggml's device enumeration), no model, no context
            _read_at(seen, "init", "PROBE INIT", proc, log_path, args.timeout, 0.3)
            _send(proc, "go")
        _read_at(seen, "loaded", "PROBE READY", proc, log_path, args.timeout, 0.5)
        if args.prompt > 0:
            _send(proc, "warmup")
            _read_at(seen, "warm", "PROBE WARM", proc, log_path, args.timeout, 0.3)
            n = max(1, min(args.prompt, case["ctx"] - 16))
            _send(proc, f"prompt {n}")
            _read_at(seen, "decoded", "PROBE DECODED", proc, log_path, args.timeout, 0.3)
            seen["prompt_tokens"] = n
    finally:
        _stop(proc)
    seen["exit_code"] = proc.returncode
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe", default=os.environ.get("PROBE_BIN", DEFAULT_PROBE))
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--n-seq-max", type=int, default=4)
    ap.add_argument("--n-ubatch", type=int, default=512)
    ap.add_argument("--n-batch", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=2048, help="tokens to decode after the warmup; 0: load only")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each PROBE marker")
    ap.add_argument("--budget", type=float, default=0.0, help="stop starting new cases after this many seconds")
    ap.add_argument(
        "--init-cases", type=int, default=6, help="in the first N cases also read nvidia-smi before loading"
    )
    ap.add_argument("--limit", type=int, default=0, help="run only the first N cases (testing)")
    ap.add_argument("--in-order", action="store_true", help="_cases() order (default: the most telling first)")
    ap.add_argument("--cpu-ok", action="store_true", help="do not stop when ngl>0 loads no CUDA0 model buffer")
    args = ap.parse_args()
    if args.out is None:
        ap.error("set OUT or --out")
    if not os.access(args.probe, os.X_OK):
        print(f"measure.py: no probe binary at {args.probe}", file=sys.stderr)
        return 1
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    gpu = gm._smi(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]).strip()
    (out / "smi-gpu.csv").write_text(gm._smi(gm.QUERY_GPU))
    shapes = {s.name: s for s in gm.ALL_SHAPES}
    cases = gm._cases() if args.in_order else _prioritised(gm._cases())
    cases = cases[: args.limit or None]
    doc: dict[str, Any] = {
        "binary": f"cudaprobe (llama.cpp from llama_cpp_python 0.3.36, CUDA sm_90) {args.probe}",
        "gpu": gpu,
        "probe_args": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "records": [],
    }
    checked = False
    rc = 0
    with tempfile.TemporaryDirectory(prefix="cudaprobe-") as tmp:
        for i, case in enumerate(cases):
            if args.budget and time.monotonic() - t_start > args.budget:
                print(f"measure.py: budget of {args.budget} s spent; {len(cases) - i} cases not run", file=sys.stderr)
                rc = 2
                break
            model = Path(tmp) / f"{case['shape']}.gguf"
            if not model.exists():
                write_synth_gguf(model, shapes[case["shape"]])
            log_path = Path(tmp) / "probe.log"
            t = time.monotonic()
            try:
                seen = run_case(args.probe, model, case, args, log_path, pause_init=i < args.init_cases)
                err = None
            except Exception as e:  # a failed load is recorded, the others still run
                seen, err = {}, str(e)[-2000:]
            text = log_path.read_text(errors="replace") if log_path.exists() else ""
            lines = [ln for ln in text.splitlines() if any(k in ln for k in gm._KEEP)]
            probe_lines = [ln for ln in text.splitlines() if ln.startswith(("probe:", "ggml_cuda_init", "Device "))]
            rec = {
                **case,
                **seen,
                "lines": lines,
                "probe_lines": probe_lines,
                "seconds": round(time.monotonic() - t, 2),
            }
            if err is None:
                rep = parse_log(text)
                if not rep.model or not rep.compute:
                    err = "no memory figures in the probe's log:\n" + text[-2000:]
            if err is not None:
                rec["error"] = err
            if case["ngl"] > 0 and not (out / "cuda_sample.log").exists():
                (out / "cuda_sample.log").write_text(text[-2_000_000:])
            doc["records"].append(rec)
            tmp_json = out / "cuda_memory.json.tmp"
            tmp_json.write_text(json.dumps(doc, indent=1))
            tmp_json.replace(out / "cuda_memory.json")
            short = {k: v for k, v in rec.items() if not k.endswith(("lines", "apps"))}
            print(json.dumps(short)[:600], flush=True)
            if case["ngl"] > 0 and not checked:
                checked = True
                if not any("CUDA0 model buffer size" in ln for ln in lines) and not args.cpu_ok:
                    print(
                        "measure.py: the first ngl>0 load has no CUDA0 model buffer (no GPU used); stopping",
                        file=sys.stderr,
                    )
                    return 1
    n_err = sum(1 for r in doc["records"] if "error" in r)
    print(
        f"measure.py: {len(doc['records'])} cases, {n_err} errors, {time.monotonic() - t_start:.0f} s"
        f" -> {out / 'cuda_memory.json'}",
        flush=True,
    )
    return rc or (1 if n_err else 0)


if __name__ == "__main__":
    sys.exit(main())
