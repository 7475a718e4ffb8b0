"""The CPU of the machine `homelab` runs on, read from /proc/cpuinfo, and the nodes that are this machine.

Only the reading lives here; `solver.cpu.cpu_flags` parses the text, `solver.cpu.cpu_kind` says what the
flags mean for llama.cpp's memory, and `solver.profiles.planned_cpus` decides, per node, which CPU the
estimates are for (the spec's `cpu:` first).

A node is **this machine** (`is_this_machine`) when homelab runs its commands here (`is_local`: a loopback
address or `localhost`, and no `ssh` section), or when its Docker endpoint is `unix://` (a socket on this
machine, so its containers run on this CPU). A host name is not compared with this machine's: the same name
can be another machine on another network, and one spec is used from several machines.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from controller.drivers.ssh import is_local
from solver.cpu import CpuKind, cpu_flags, cpu_kind
from solver.profiles import PlannedCpu, planned_cpus
from specs.model import ClusterSpec, Node

CPUINFO = Path("/proc/cpuinfo")

HostCpu = Callable[[], frozenset[str]]
"""How this machine's CPU flags are read: `local_cpu_flags`, or fixed flags in tests."""


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


def is_this_machine(node: Node) -> bool:
    """The node is the machine homelab runs on (see the module docstring)."""
    if is_local(node):
        return True
    endpoint = node.docker.endpoint if node.docker is not None else ""
    return endpoint.lower().startswith("unix://")


def host_cpus(spec: ClusterSpec, read: HostCpu = local_cpu_flags) -> dict[str, PlannedCpu]:
    """Per node, the CPU its estimates are for (`planned_cpus`), this machine's flags read (once, through `read`)
    only when a node that is this machine states no `cpu:`."""
    local = [n.name for n in spec.nodes if n.cpu is None and is_this_machine(n)]
    flags = read() if local else frozenset()
    return planned_cpus(spec, dict.fromkeys(local, flags))
