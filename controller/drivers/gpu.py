"""A node's NVIDIA GPUs and the GPU memory of each process, from `nvidia-smi` run on the node (and its RAM and CPU).

    reports = discover_gpus(spec.nodes)          # {node name: NodeGpus}, nodes probed concurrently
    reports["box"].gpus[0].total_bytes, reports["box"].processes, reports["box"].ram_bytes

Four commands per node, through `controller.drivers.ssh` (locally, or over one
SSH session for a remote node):

    nvidia-smi --query-gpu=index,name,uuid,memory.total,memory.used,memory.free,driver_version,pci.bus_id \
        --format=csv,noheader,nounits
    nvidia-smi --query-compute-apps=pid,process_name,used_memory,gpu_uuid --format=csv,noheader,nounits
    cat /proc/meminfo                          (MemTotal; not on windows-docker-desktop nodes)
    grep -m1 -iE '^(flags|features)[[:space:]]*:' /proc/cpuinfo
                                               (the first CPU's feature flags, x86 `flags` or ARM
                                               `Features`: one line, however many CPUs; not on
                                               windows-docker-desktop nodes either)

Parsing is defensive: a header line and unit suffixes (`81559 MiB`, also KiB /
GiB) are accepted as well as the bare numbers asked for; `[N/A]`, `N/A`,
`[Not Supported]` and the like read as unknown (None) — MIG devices report a
process's memory that way; a process on a GPU UUID the GPU list does not have (a
MIG device's own UUID) is kept with that UUID and matched to no GPU; an empty
process list is no processes. A line that cannot be read is a `BadOutput` naming
the command and the line. CPU flags that cannot be read are a note, never an error.

Errors per node are one line (`NodeGpus.error`) and never stop the other nodes:
no nvidia-smi (`node X: nvidia-smi not found`), nvidia-smi failing (its own
message, e.g. "No devices were found"), malformed output, or SSH failing. RAM and
CPU flags are still reported when only the GPU query failed.
"""

from __future__ import annotations

import asyncio
import csv
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from controller.drivers.base import BadOutput, CommandFailed, DriverError
from controller.drivers.ssh import DEFAULT_TIMEOUT_S, NOT_FOUND, NodeShell, node_shell
from specs.enums import OsFamily
from specs.model import Node

MIB = 2**20

GPU_FIELDS = ("index", "name", "uuid", "memory.total", "memory.used", "memory.free", "driver_version", "pci.bus_id")
APP_FIELDS = ("pid", "process_name", "used_memory", "gpu_uuid")
QUERY_GPU = ["nvidia-smi", "--query-gpu=" + ",".join(GPU_FIELDS), "--format=csv,noheader,nounits"]
QUERY_APPS = ["nvidia-smi", "--query-compute-apps=" + ",".join(APP_FIELDS), "--format=csv,noheader,nounits"]
MEMINFO = ["cat", "/proc/meminfo"]
CPUINFO_FLAGS = ["grep", "-m1", "-iE", "^(flags|features)[[:space:]]*:", "/proc/cpuinfo"]

_UNKNOWN = re.compile(
    r"^\[?(n/?a|not supported|unknown error|insufficient permissions|gpu is lost|requires root)\]?$", re.I
)
_AMOUNT = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMG]i?B)?$", re.I)
_UNIT_BYTES = {"KIB": 2**10, "KB": 2**10, "MIB": MIB, "MB": MIB, "GIB": 2**30, "GB": 2**30}


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as nvidia-smi reports it; a memory figure it cannot give is None."""

    index: int
    name: str
    uuid: str
    total_bytes: int | None
    used_bytes: int | None
    free_bytes: int | None
    driver: str
    bus_id: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "name": self.name,
            "uuid": self.uuid,
            "total_bytes": self.total_bytes,
            "used_bytes": self.used_bytes,
            "free_bytes": self.free_bytes,
            "driver": self.driver,
            "bus_id": self.bus_id,
        }


@dataclass(frozen=True)
class GpuProcess:
    """A compute process holding GPU memory (its PID as the node's kernel numbers it)."""

    pid: int
    name: str
    used_bytes: int | None
    gpu_uuid: str

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "name": self.name, "used_bytes": self.used_bytes, "gpu_uuid": self.gpu_uuid}


@dataclass(frozen=True)
class NodeGpus:
    """What one node really has. `error` (one line) says why GPUs or processes are missing."""

    node: str
    gpus: tuple[GpuInfo, ...] = ()
    processes: tuple[GpuProcess, ...] | None = None
    """None when unknown (the process query failed); () when no process holds GPU memory."""
    ram_bytes: int | None = None
    error: str | None = None
    notes: tuple[str, ...] = field(default=())
    """Things worth saying that are not errors (RAM not readable on this OS …)."""
    cpuinfo: str | None = None
    """The first CPU's feature-flag line of /proc/cpuinfo (`flags : fpu …`, ARM `Features : …`), for
    `solver.cpu.cpu_flags`; None when it could not be read."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def gpu(self, *, index: int | None = None, uuid: str | None = None) -> GpuInfo | None:
        for g in self.gpus:
            if (uuid is not None and g.uuid == uuid) or (uuid is None and g.index == index):
                return g
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "node": self.node,
            "gpus": [g.to_json() for g in self.gpus],
            "processes": None if self.processes is None else [p.to_json() for p in self.processes],
            "ram_bytes": self.ram_bytes,
            "error": self.error,
            "notes": list(self.notes),
            "cpuinfo": self.cpuinfo,
        }


# --------------------------------------------------------------------------- parsing


def parse_amount(text: str, *, default_unit: int = MIB) -> int | None:
    """`81559 MiB`, `81559` (nounits: MiB), `1.5 GiB` → bytes; `[N/A]` and the like → None."""
    value = text.strip()
    if not value or _UNKNOWN.match(value):
        return None
    m = _AMOUNT.match(value)
    if m is None:
        raise ValueError(f"not a memory amount: {value!r}")
    unit = _UNIT_BYTES[m[2].upper()] if m[2] else default_unit
    return int(float(m[1]) * unit)


def _rows(text: str, fields: Sequence[str], what: str) -> list[tuple[int, list[str]]]:
    """CSV rows with their line numbers; a header line (`index, name, …`) and blank lines skipped."""
    rows: list[tuple[int, list[str]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = [c.strip() for c in next(csv.reader([line], skipinitialspace=True))]
        if number == 1 and cells and cells[0].lower() == fields[0]:
            continue  # the header of --format=csv without noheader
        if len(cells) != len(fields):
            raise BadOutput(f"{what}: line {number}: expected {len(fields)} fields, got {len(cells)}: {_short(line)}")
        rows.append((number, cells))
    return rows


def _short(line: str) -> str:
    line = " ".join(line.split())
    return repr(line if len(line) <= 80 else line[:77] + "...")


def parse_gpus(text: str) -> tuple[GpuInfo, ...]:
    """The output of QUERY_GPU (with or without header and units)."""
    what = "nvidia-smi --query-gpu"
    gpus: list[GpuInfo] = []
    for number, cells in _rows(text, GPU_FIELDS, what):
        index, name, uuid, total, used, free, driver, bus = cells
        if not index.isdigit():
            raise BadOutput(f"{what}: line {number}: GPU index {index!r} is not a number")
        try:
            total_b, used_b, free_b = (parse_amount(v) for v in (total, used, free))
        except ValueError as exc:
            raise BadOutput(f"{what}: line {number}: {exc}") from None
        gpus.append(GpuInfo(int(index), name, uuid, total_b, used_b, free_b, driver=driver, bus_id=bus))
    if len({g.index for g in gpus}) != len(gpus):
        raise BadOutput(f"{what}: a GPU index appears twice")
    return tuple(sorted(gpus, key=lambda g: g.index))


def parse_processes(text: str) -> tuple[GpuProcess, ...]:
    """The output of QUERY_APPS; no lines (or the header alone) is no processes."""
    what = "nvidia-smi --query-compute-apps"
    if text.strip().lower().startswith("no running"):  # old drivers: "No running processes found"
        return ()
    procs: list[GpuProcess] = []
    for number, cells in _rows(text, APP_FIELDS, what):
        pid, name, used, uuid = cells
        if not pid.isdigit():
            raise BadOutput(f"{what}: line {number}: pid {pid!r} is not a number")
        try:
            amount = parse_amount(used)
        except ValueError as exc:
            raise BadOutput(f"{what}: line {number}: {exc}") from None
        procs.append(GpuProcess(int(pid), name, amount, uuid))
    return tuple(procs)


def parse_meminfo(text: str) -> int:
    """MemTotal of /proc/meminfo, in bytes."""
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key.strip() == "MemTotal":
            try:
                amount = parse_amount(rest, default_unit=1024)
            except ValueError:
                amount = None
            if amount:
                return amount
            break
    raise BadOutput(f"/proc/meminfo: no readable MemTotal line: {_short(text[:80])}")


# --------------------------------------------------------------------------- probing


async def probe(shell: NodeShell, node: Node, *, timeout: float = DEFAULT_TIMEOUT_S) -> NodeGpus:
    """Query GPUs, processes and RAM through an open shell; SSH failures propagate."""
    name = node.name
    ram: int | None = None
    notes: list[str] = []
    error: str | None = None
    if node.os is OsFamily.WINDOWS_DOCKER_DESKTOP:
        notes.append("RAM is not read on windows-docker-desktop nodes")
    else:
        try:
            result = await shell.run(MEMINFO, timeout=timeout)
            if result.exit_status != 0:
                raise CommandFailed(f"cannot read /proc/meminfo: {result.error_line or f'exit {result.exit_status}'}")
            ram = parse_meminfo(result.text)
        except (CommandFailed, BadOutput) as exc:
            notes.append(f"RAM unknown: {exc}")
    flags: str | None = None
    if node.os is not OsFamily.WINDOWS_DOCKER_DESKTOP:
        try:
            flags = await _cpuinfo_flags(shell, timeout)
        except CommandFailed as exc:
            notes.append(f"CPU features unknown: {exc}")
    gpus: tuple[GpuInfo, ...] = ()
    processes: tuple[GpuProcess, ...] | None = None
    try:
        result = await shell.run(QUERY_GPU, timeout=timeout)
        _check(result.exit_status, result.error_line, name)
        gpus = parse_gpus(result.text)
        result = await shell.run(QUERY_APPS, timeout=timeout)
        _check(result.exit_status, result.error_line, name)
        processes = parse_processes(result.text)
    except DriverError as exc:
        text = str(exc)
        error = text if text.startswith(f"node {name}:") else f"node {name}: {text}"
    return NodeGpus(name, gpus, processes, ram, error, tuple(notes), flags)


async def _cpuinfo_flags(shell: NodeShell, timeout: float) -> str:
    result = await shell.run(CPUINFO_FLAGS, timeout=timeout)
    if result.exit_status == 1:  # grep: no such line (an architecture whose cpuinfo names no flags)
        raise CommandFailed("/proc/cpuinfo has no flags or Features line")
    if result.exit_status != 0:
        raise CommandFailed(f"cannot read /proc/cpuinfo: {result.error_line or f'exit {result.exit_status}'}")
    return result.text.strip()


def _check(status: int, message: str, node: str) -> None:
    if status == NOT_FOUND:
        raise CommandFailed(f"node {node}: nvidia-smi not found")
    if status != 0:
        raise CommandFailed(f"node {node}: nvidia-smi failed (exit {status}): {message or 'no message'}")


ShellFactory = Callable[[Node], NodeShell]


async def probe_node(node: Node, *, shell: ShellFactory = node_shell, timeout: float = DEFAULT_TIMEOUT_S) -> NodeGpus:
    """One node's GPUs, processes and RAM; every failure becomes `NodeGpus.error`, never an exception."""
    try:
        async with shell(node) as sh:
            return await probe(sh, node, timeout=timeout)
    except DriverError as exc:
        text = str(exc)
        return NodeGpus(node.name, error=text if text.startswith(f"node {node.name}:") else f"node {node.name}: {text}")


async def probe_nodes(
    nodes: Sequence[Node], *, shell: ShellFactory = node_shell, timeout: float = DEFAULT_TIMEOUT_S
) -> dict[str, NodeGpus]:
    results = await asyncio.gather(*(probe_node(n, shell=shell, timeout=timeout) for n in nodes))
    return {r.node: r for r in results}


def discover_gpus(nodes: Sequence[Node]) -> Mapping[str, NodeGpus]:
    """Every node probed concurrently (a fresh event loop; call `probe_nodes` from async code)."""
    if not nodes:
        return {}
    return asyncio.run(probe_nodes(nodes))


GpuProbe = Callable[[Sequence[Node]], Mapping[str, NodeGpus]]
"""How nodes' GPUs are discovered: `discover_gpus`, or a fake in tests."""
