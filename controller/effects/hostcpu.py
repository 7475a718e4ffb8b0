"""The CPU of the machine `homelab` runs on, read from /proc/cpuinfo.

Only the reading lives here; `solver.cpu.cpu_flags` parses the text and `solver.cpu.cpu_kind`
says what the flags mean for llama.cpp's memory.
"""

from __future__ import annotations

from pathlib import Path

from solver.cpu import CpuKind, cpu_flags, cpu_kind

CPUINFO = Path("/proc/cpuinfo")


def local_cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """The feature flags of this machine's CPU (empty where /proc/cpuinfo cannot be read, e.g. macOS)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return frozenset()
    return cpu_flags(text)


def local_cpu_kind(path: Path = CPUINFO) -> CpuKind:
    """This machine's `CpuKind`; UNKNOWN where its flags cannot be read."""
    flags = local_cpu_flags(path)
    return cpu_kind(flags) if flags else CpuKind.UNKNOWN
