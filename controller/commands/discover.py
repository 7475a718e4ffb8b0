"""`homelab discover [NODE…] [--write] [--yes] [-f FILE] [--json]`: what the nodes really have.

Runs `nvidia-smi` and reads /proc/meminfo and /proc/cpuinfo on each node (locally or over SSH,
`controller.drivers.gpu`), prints every GPU (index, name, total and free
memory, driver, UUID), the processes holding GPU memory, the node's RAM and CPU,
and then the changes that would bring the spec in line, as a unified diff of
the spec file.

Without `--write` nothing is written. With it, the diff is applied to the file
in place — asking first unless `--yes` (and refusing without `--yes` when there
is no terminal to ask on). The file is edited through its ruamel.yaml
round-trip tree (`specs.load`), so only the edited values change: comments,
key order, quoting and layout everywhere else stay byte for byte, and the
previous file is kept as NAME.bak. The edited spec is validated before it is
written.

What is edited, per node that answered:

- each GPU the node has: `name`, `vram` (nvidia-smi's figure, written in MiB,
  e.g. `81559MiB`) and `uuid` of the spec's entry for it (matched by `uuid`
  when the spec has one, else by `index`); a GPU the spec lacks is added;
- `ram`: MemTotal, rounded down to a MiB;
- `cpu: {features: [...]}`: the flags of /proc/cpuinfo that decide llama.cpp's
  extra weight buffers on the CPU (`solver.cpu.KIND_FLAGS`: avx2, avx512f,
  avx512_vnni, amx_int8, asimd, asimddp, i8mm), `[]` for a CPU with none of
  them. Only those: the whole list is a hundred-odd words that kernels add to
  and rename, so every kernel update would show a diff that changes no plan. A
  spec that already states features giving the same kind-deciding flags (the
  whole list, say) is left alone.

A GPU the spec lists but the node does not have is reported and left in the
file (a pin may name it): remove it by hand. A node that fails (no SSH, no
nvidia-smi, unreadable output) is one `error:` line; the others still report,
and the exit status is 1.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import typer
from rich.markup import escape
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from controller.commands.common import (
    SpecFileOption,
    err,
    fail,
    load_or_exit,
    out,
    print_diagnostics,
    spec_path,
    wiring_of,
)
from controller.drivers.gpu import GpuInfo, NodeGpus
from controller.drivers.ssh import is_local
from solver.cpu import cpu_flags, cpu_kind, kind_flags
from solver.explain import gib
from specs import SpecError
from specs.load import SpecDocument, dump_document, parse_spec, save_document
from specs.model import ClusterSpec, Node

MIB = 2**20
GIB = 2**30


def size_text(n_bytes: int) -> str:
    """A size as the spec writes it, without losing a MiB: `24GiB`, `81559MiB`."""
    if n_bytes % GIB == 0:
        return f"{n_bytes // GIB}GiB"
    return f"{n_bytes // MIB}MiB"


# --------------------------------------------------------------------------- editing the spec


def apply_discovery(doc: SpecDocument, spec: ClusterSpec, reports: Mapping[str, NodeGpus]) -> list[str]:
    """Edit `doc.data` in place so the spec says what the nodes have; return one line per GPU left alone."""
    notes: list[str] = []
    nodes_seq = doc.data["nodes"]
    for i, node in enumerate(spec.nodes):
        report = reports.get(node.name)
        if report is None:
            continue
        node_map = nodes_seq[i]
        if report.ram_bytes is not None:
            ram = report.ram_bytes // MIB * MIB
            if ram != node.ram:
                node_map["ram"] = size_text(ram)
        if report.cpuinfo is not None:
            _edit_cpu(node_map, node, kind_flags(cpu_flags(report.cpuinfo)))
        if not report.ok:
            continue
        _edit_gpus(node_map, node, report.gpus)
        for gpu in node.gpus:
            matched = report.gpu(uuid=gpu.uuid) if gpu.uuid else report.gpu(index=gpu.index)
            if matched is None:
                notes.append(
                    f"node {node.name}: GPU {gpu.index} ({gpu.name}) is in the spec but not on the node;"
                    " left in the file: remove it by hand if it is gone"
                )
    return notes


def _edit_cpu(node_map: CommentedMap, node: Node, features: list[str]) -> None:
    """`cpu: {features: [...]}` as discovered, unless the spec's features already decide the same."""
    if node.cpu is not None and kind_flags(node.cpu.features) == features:
        return
    seq = CommentedSeq(features)
    seq.fa.set_flow_style()
    cpu = node_map.get("cpu")
    if isinstance(cpu, CommentedMap):
        cpu["features"] = seq
        return
    cpu = CommentedMap(features=seq)
    cpu.fa.set_flow_style()
    keys = list(node_map.keys())
    node_map.insert(keys.index("ram") + 1 if "ram" in keys else len(keys), "cpu", cpu)


def _edit_gpus(node_map: CommentedMap, node: Node, found: Sequence[GpuInfo]) -> None:
    if not found:
        return
    seq = node_map.get("gpus")
    if seq is None:
        seq = CommentedSeq()
        keys = list(node_map.keys())
        node_map.insert(keys.index("ram") if "ram" in keys else len(keys), "gpus", seq)
    for info in found:
        position = _spec_entry(node, info)
        if position is None:
            seq.append(_new_entry(seq, info))
            continue
        entry = seq[position]
        spec_gpu = node.gpus[position]
        if spec_gpu.name != info.name:
            entry["name"] = info.name
        if info.total_bytes is not None and spec_gpu.vram != info.total_bytes:
            entry["vram"] = size_text(info.total_bytes)
        if info.uuid and spec_gpu.uuid != info.uuid:
            entry["uuid"] = info.uuid


def _spec_entry(node: Node, info: GpuInfo) -> int | None:
    """Position in the spec's `gpus` of the entry for this GPU: by uuid, else by index (without a uuid)."""
    for i, gpu in enumerate(node.gpus):
        if gpu.uuid == info.uuid:
            return i
    for i, gpu in enumerate(node.gpus):
        if gpu.uuid is None and gpu.index == info.index:
            return i
    return None


def _new_entry(seq: CommentedSeq, info: GpuInfo) -> CommentedMap:
    entry = CommentedMap()
    entry["index"] = info.index
    entry["name"] = info.name
    if info.total_bytes is not None:
        entry["vram"] = size_text(info.total_bytes)
    entry["uuid"] = info.uuid
    previous = seq[-1] if len(seq) else None
    if previous is None or (isinstance(previous, CommentedMap) and previous.fa.flow_style()):
        entry.fa.set_flow_style()  # like its neighbours, or one line as the README writes GPUs
    return entry


def unified_diff(before: str, after: str, name: str) -> str:
    lines = difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True), fromfile=name, tofile=name
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


# --------------------------------------------------------------------------- printing


def _describe(node: Node, report: NodeGpus) -> list[str]:
    how = "local" if is_local(node) else "ssh"
    lines = [f"node {node.name} ({node.address}, {how}):"]
    for g in report.gpus:
        total = gib(g.total_bytes) if g.total_bytes is not None else "unknown"
        free = gib(g.free_bytes) if g.free_bytes is not None else "unknown"
        lines.append(f"  GPU {g.index}  {g.name}  {total} total, {free} free  driver {g.driver}  {g.uuid}")
        for p in report.processes or ():
            if p.gpu_uuid == g.uuid:
                used = gib(p.used_bytes) if p.used_bytes is not None else "unknown"
                lines.append(f"    process {p.pid} {p.name}: {used}")
    if report.ok and not report.gpus:
        lines.append("  no NVIDIA GPUs")
    lines.append(f"  RAM {gib(report.ram_bytes)}" if report.ram_bytes is not None else "  RAM unknown")
    if report.cpuinfo is not None:
        flags = kind_flags(cpu_flags(report.cpuinfo))
        lines.append(f"  CPU {cpu_kind(flags).value} ({' '.join(flags) or 'none of avx2, asimd'})")
    lines.extend(f"  note: {n}" for n in report.notes)
    return lines


def _node_json(report: NodeGpus) -> dict[str, Any]:
    data: dict[str, Any] = report.to_json()
    flags = kind_flags(cpu_flags(report.cpuinfo)) if report.cpuinfo is not None else None
    data["cpu_features"] = flags
    data["cpu_kind"] = cpu_kind(flags).value if flags is not None else None
    return data


def register(app: typer.Typer) -> None:
    @app.command()
    def discover(
        ctx: typer.Context,
        nodes: Annotated[
            list[str] | None, typer.Argument(help="Nodes to look at [default: all]", show_default=False)
        ] = None,
        file: SpecFileOption = None,
        write: Annotated[bool, typer.Option("--write", help="Write the changes into the spec file.")] = False,
        yes: Annotated[bool, typer.Option("--yes", "-y", help="Write without asking.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print what was found as JSON.")] = False,
    ) -> None:
        """Find each node's GPUs, RAM and CPU features (nvidia-smi, /proc/meminfo, /proc/cpuinfo; over SSH for remote
        nodes)."""
        path = spec_path(file)
        loaded = load_or_exit(path)
        spec = loaded.spec
        names = list(nodes or [])
        known = [n.name for n in spec.nodes]
        unknown = [n for n in names if n not in known]
        if unknown:
            fail(f"unknown node{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (nodes: {', '.join(known)})")
        chosen = [n for n in spec.nodes if not names or n.name in names]
        reports = wiring_of(ctx).gpu_probe(chosen)
        doc = loaded.document
        notes = apply_discovery(doc, spec, reports)
        after = dump_document(doc)
        diff = unified_diff(doc.text, after, str(path))
        failed = [reports[n.name] for n in chosen if n.name in reports and not reports[n.name].ok]

        if as_json:
            data: dict[str, Any] = {
                "nodes": {n.name: _node_json(reports[n.name]) for n in chosen if n.name in reports},
                "spec_diff": diff,
                "notes": notes,
            }
            out.print(json.dumps(data, indent=2), markup=False)
        else:
            for node in chosen:
                if node.name in reports:
                    for line in _describe(node, reports[node.name]):
                        out.print(line, markup=False)
            for note in notes:
                out.print(note, markup=False)
            out.print("", markup=False)
            if diff:
                out.print(f"Changes to {path}:" if write else f"Would change {path} (--write to apply):", markup=False)
                out.print(diff, markup=False, end="")
            else:
                out.print(f"{path} already says what the nodes have.", markup=False)
        for report in failed:
            err.print(f"[red]error:[/red] {escape(report.error or '')}", markup=True, highlight=False)

        if write and diff:
            try:
                parse_spec(after, path)
            except SpecError as exc:
                print_diagnostics(exc.diagnostics)
                fail(f"not writing {path}: the edited spec would not be valid")
            if not yes:
                if not sys.stdin.isatty():
                    fail("not writing without confirmation: run in a terminal or pass --yes")
                if not typer.confirm(f"Write these changes to {path}?", default=False):
                    fail("not written")
            try:
                backup = save_document(doc)
            except OSError as exc:
                fail(f"{path}: cannot write: {exc.strerror}")
            kept = f" (previous version kept as {backup})" if backup is not None else ""
            err.print(f"wrote {path}{kept}", markup=False)
        if failed:
            raise typer.Exit(1)
