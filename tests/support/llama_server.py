"""Load a GGUF into a real llama-server and read back the memory it reports.

Test and benchmark support only (it starts a process); the solver itself never
imports this module. The server is started on 127.0.0.1 with a free port and
`-lv 4`, stopped as soon as it reports that the model is loaded, and the
buffer lines of its log are parsed:

    load_tensors:   CPU_Mapped model buffer size =   235.16 MiB
    llama_kv_cache: size =   12.00 MiB (  4096 cells, ...)
    sched_reserve:        CPU compute buffer size =    24.27 MiB
    llama_context:        CPU  output buffer size =     4.00 MiB

Sizes in the log have two decimals of MiB, so a reported figure is exact to
about ±5 KiB.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import llamacpp_build
from tests.support.ports import free_port

MIB = 1024 * 1024

_MODEL_RE = re.compile(r"(\S+) model buffer size =\s+([\d.]+) MiB")
_KV_RE = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB")
_COMPUTE_RE = re.compile(r"(\S+) compute buffer size =\s+([\d.]+) MiB")
_KV_BUF_RE = re.compile(r"llama_kv_cache:\s+(\S+) KV buffer size =\s+([\d.]+) MiB")
_OUTPUT_RE = re.compile(r"(\S+)\s+output buffer size =\s+([\d.]+) MiB")
_READY_MARKERS = ("server is listening", "listening on http", "model loaded")
# `-fit on` (common/fit.cpp): a dry run of the load before the real one prints a breakdown table whose rows end
# in "self = model + context + compute" ("|   - AMX   |   92 =    92 +       0 +       0   |"), then one line per
# kind of memory ("projected to use 50 MiB of host memory vs. 24105 MiB of total host memory").
_FIT_RE = re.compile(r"projected to use (\d+) MiB of (\w+) memory")
_FIT_ROW_RE = re.compile(r"memory_breakdown_print: \|\s+- (.+?)\s+\|.*?(\d+) =\s+(\d+) \+\s+(\d+) \+\s+(\d+)")


class LlamaServerError(RuntimeError):
    """llama-server is missing, failed to load a model, or printed no figures."""


@dataclass(frozen=True)
class ReportedMemory:
    """Buffer sizes llama.cpp printed while loading a model, in bytes."""

    model: dict[str, int] = field(default_factory=dict)
    """`<buffer type> model buffer size`, e.g. {"CPU_Mapped": ..., "CPU_REPACK": ...}."""
    kv: int = 0
    """Sum of every `llama_kv_cache: size =` line (two of them for SWA models)."""
    kv_buffers: dict[str, int] = field(default_factory=dict)
    """`<buffer type> KV buffer size` summed per buffer type (where the KV cache lives: CPU, Vulkan0…)."""
    compute: dict[str, int] = field(default_factory=dict)
    output: dict[str, int] = field(default_factory=dict)
    fit_projected: dict[str, int] = field(default_factory=dict)
    """`-fit on` only: what llama.cpp's own fit projects, by kind of memory (`host`, `device`), bytes."""
    fit_rows: dict[str, int] = field(default_factory=dict)
    """`-fit on` only: the `self` column per row (`Host`, `AMX`, `Vulkan0 (…)`) of the memory breakdown of its dry
    run, printed before the projection, bytes (llama-server prints the table again at exit, with what it held)."""
    log: str = ""


def _mib(text: str) -> int:
    return round(float(text) * MIB)


def parse_log(log: str) -> ReportedMemory:
    """Parse the memory lines of a llama-server `-lv 4` log."""
    model: dict[str, int] = {}
    compute: dict[str, int] = {}
    output: dict[str, int] = {}
    kv = 0
    kv_buffers: dict[str, int] = {}
    fit: dict[str, int] = {}
    rows: dict[str, int] = {}
    for line in log.splitlines():
        if m := _MODEL_RE.search(line):
            model[m.group(1)] = model.get(m.group(1), 0) + _mib(m.group(2))
        elif m := _KV_BUF_RE.search(line):
            kv_buffers[m.group(1)] = kv_buffers.get(m.group(1), 0) + _mib(m.group(2))
        elif m := _KV_RE.search(line):
            kv += _mib(m.group(1))
        elif m := _COMPUTE_RE.search(line):
            compute[m.group(1)] = _mib(m.group(2))
        elif m := _OUTPUT_RE.search(line):
            output[m.group(1)] = _mib(m.group(2))
        elif m := _FIT_RE.search(line):
            fit[m.group(2)] = fit.get(m.group(2), 0) + int(m.group(1)) * MIB
        elif (m := _FIT_ROW_RE.search(line)) and not fit:
            rows[m.group(1)] = int(m.group(2)) * MIB  # the dry run's table, not the one printed at exit
    return ReportedMemory(
        model=model,
        kv=kv,
        kv_buffers=kv_buffers,
        compute=compute,
        output=output,
        fit_projected=fit,
        fit_rows=rows if fit else {},
        log=log,
    )


def find_binary(name: str | None = None) -> str:
    """The llama-server to run: `name` (a path, or a command on PATH) when given — a GPU build for
    bench/gpu_memory.py, say — else the project's own build (tests/support/llamacpp_build.py: built once per
    machine, every CPU variant; the first call builds it). A CPU that no variant of the build can serve is a
    clear error here, not a SIGILL later."""
    if name is not None:
        path = shutil.which(name)
        if path is None:
            raise LlamaServerError(f"{name} not found (a path or a command on PATH)")
        return path
    try:
        build = llamacpp_build.ensure()
        llamacpp_build.check_runs_here(build)
    except llamacpp_build.LlamaCppBuildError as exc:
        raise LlamaServerError(str(exc)) from exc
    return str(build.server)


def exit_reason(returncode: int) -> str:
    """How a llama-server process ended, in words; an illegal instruction names its likely cause."""
    if returncode in (-signal.SIGILL, 128 + signal.SIGILL):
        return (
            f"exit {returncode}: illegal instruction (SIGILL): the CPU backend it loaded uses an instruction this "
            "CPU lacks; run the project's own build (tests/support/llamacpp_build.py), which picks its CPU "
            "variant at start"
        )
    if returncode < 0:
        try:
            return f"killed by signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


def measure(
    model_path: str | Path,
    *,
    ctx: int,
    cache_type: str = "f16",
    flash_attn: bool = True,
    ngl: int | None = None,
    binary: str | None = None,
    threads: int = 1,
    timeout_s: float = 90.0,
    extra_args: tuple[str, ...] = (),
    while_loaded: Callable[[int], None] | None = None,
    fit: bool = False,
) -> ReportedMemory:
    """Start llama-server on `model_path`, wait until it has loaded, stop it, parse its log.

    `fit`: run with `-fit on` (llama.cpp's default), so the log also holds llama.cpp's own projection
    (`ReportedMemory.fit_projected`). It may change only what the command line leaves unset (the GPU
    layers when `ngl` is None; the context is always set here) and logs "no changes needed" when it
    changes nothing. Off by default, so that nothing is adjusted behind a measurement.

    `while_loaded(pid)` runs once the model is loaded, before the server is stopped (to read
    nvidia-smi while the server holds its GPU memory)."""
    exe = find_binary(binary)
    args = [
        exe,
        "-m",
        str(model_path),
        "-c",
        str(ctx),
        "-t",
        str(threads),
        "-lv",
        "4",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--no-warmup",
        "-fit",
        "on" if fit else "off",
        "-fa",
        "on" if flash_attn else "off",
        "-ctk",
        cache_type,
        "-ctv",
        cache_type,
        *extra_args,
    ]
    if ngl is not None:
        args += ["-ngl", str(ngl)]
    with tempfile.TemporaryDirectory(prefix="homelab-llama-") as tmp:
        log_path = Path(tmp) / "server.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                args,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            deadline = time.monotonic() + timeout_s
            try:
                while True:
                    text = log_path.read_text(errors="replace")
                    if any(m in text for m in _READY_MARKERS):
                        break
                    if proc.poll() is not None:
                        why = exit_reason(proc.returncode)
                        raise LlamaServerError(f"llama-server ended ({why}) loading {model_path}:\n{text[-3000:]}")
                    if time.monotonic() > deadline:
                        raise LlamaServerError(f"llama-server did not load {model_path} in {timeout_s} s")
                    time.sleep(0.05)
                if while_loaded is not None:
                    while_loaded(proc.pid)
            finally:
                _stop(proc)
        text = log_path.read_text(errors="replace")
    report = parse_log(text)
    if not report.model or not report.compute:
        raise LlamaServerError(f"no memory figures in the llama-server log for {model_path}:\n{text[-3000:]}")
    return report


@dataclass(frozen=True)
class Served:
    """A running llama-server of `serve`."""

    url: str
    """http://127.0.0.1:PORT"""
    log: Path
    pid: int

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def serve(
    model_path: str | Path,
    *,
    binary: str | None = None,
    ctx: int = 512,
    threads: int = 1,
    extra_args: Sequence[str] = (),
    cwd: Path | None = None,
    timeout_s: float = 120.0,
) -> Iterator[Served]:
    """A real llama-server on `model_path` at 127.0.0.1 on a free port, `-lv 4`, until the block ends; yields
    once `/health` answers 200. `binary`: a path or command (default: the project's build). `cwd`: where it
    runs (ggml also looks for CPU variants in the current directory; default a fresh empty one)."""
    exe = find_binary(binary)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="homelab-serve-") as tmp:
        log_path = Path(tmp) / "server.log"
        args = [exe, "-m", str(model_path), "-c", str(ctx), "-t", str(threads), "-lv", "4"]
        args += ["--host", "127.0.0.1", "--port", str(port), *extra_args]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                args,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=cwd or tmp,
            )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise LlamaServerError(
                        f"llama-server ended ({exit_reason(proc.returncode)}) while starting on {model_path}:\n"
                        + log_path.read_text(errors="replace")[-3000:]
                    )
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise LlamaServerError(f"llama-server did not answer /health within {timeout_s:.0f} s")
                time.sleep(0.1)
            yield Served(url, log_path, proc.pid)
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server: SIGTERM, then (it can hang while cleaning up) SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
