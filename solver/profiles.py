"""Memory profiles: what the placement solver knows about each model's memory.

A profile is a `LayerCurve` per node (VRAM and RAM for every offload level
ngl = 0 … L+1), built from the model's GGUF header when it can be read here, or
from the `memory:` the spec declares. `profiles_for` is the only function here
that touches the file system, and only through the `read_header` it is given.

The placement solver reads ngl = 0 as "no GPU at all": a replica with no GPU
layer is started without GPU access (as `cpu_only` models are), so it needs
RAM only (`curve.ram(0)`) and no VRAM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from solver.cpu import CpuKind, cpu_kind
from solver.errors import EstimateError, GGUFError
from solver.estimate import (
    DEFAULT_GPU_OVERHEAD_BYTES,
    EstimateParams,
    LayerCurve,
    ModelShape,
    SplitCurve,
    layer_curve,
    shape_from_header,
    shape_from_model_info,
    split_curve,
)
from solver.gguf import GGUFHeader
from specs.enums import LayerOrder, Runtime
from specs.model import ClusterSpec, DeclaredMemory, Model, Node

NO_ESTIMATE = "no memory estimate: GGUF not readable here and no `memory:` declared"


@dataclass(frozen=True)
class NoEstimate:
    """A model the solver cannot place because its memory is unknown."""

    reason: str = NO_ESTIMATE


@dataclass(frozen=True)
class MemoryProfile:
    """A model's memory curve, per node where nodes differ (layer order, GPU overhead).

    `shape` and `params` (per node) are kept when the curve comes from a GGUF
    header, so that explanations can recompute the curve at a smaller context.
    """

    curve: LayerCurve
    source: str = "declared"
    """`gguf` (from the header) or `declared` (the spec's `memory:`)."""
    node_curves: Mapping[str, LayerCurve] = field(default_factory=dict)
    shape: ModelShape | None = None
    node_params: Mapping[str, EstimateParams] = field(default_factory=dict)
    node_splits: Mapping[str, SplitCurve] = field(default_factory=dict)
    """Per node, the model's memory split over several GPUs (only for llama.cpp models with
    `placement.split: true` on nodes with two GPUs or more)."""
    calibrated: Mapping[str, Calibration] = field(default_factory=dict)
    """Per node where a replica of the model was measured above its estimate: what was measured, and the
    estimate it raised (the node's curve here is already raised)."""

    def for_node(self, node: str) -> LayerCurve:
        return self.node_curves.get(node, self.curve)

    def at_context(self, node: str, ctx: int) -> LayerCurve | None:
        """The node's curve at another context length, or None for a declared profile."""
        params = self.node_params.get(node)
        if self.shape is None or params is None:
            return None
        return layer_curve(self.shape, replace(params, ctx=ctx))


MEASURED_MARGIN = 0.05
"""A measured figure is reserved with this share on top (`measured · 1.05`), for what it may still grow."""


@dataclass(frozen=True)
class Measured:
    """What a running replica of a model really held on a node (`controller.effects.calibration` reads it):
    host memory from Docker's stats, VRAM from nvidia-smi (None where not measured)."""

    node: str
    gpu_layers: int
    gpus: tuple[int, ...] = ()
    ram_bytes: int | None = None
    vram_bytes: int | None = None


@dataclass(frozen=True)
class Calibration:
    """A node curve raised by a measurement, at the offload the replica ran with."""

    measured: Measured
    ram_estimate: int
    vram_estimate: int
    ram_reserved: int
    """What the raised curve reserves at that offload: max(estimate, measured + margin)."""
    vram_reserved: int

    @property
    def raised(self) -> bool:
        return self.ram_reserved > self.ram_estimate or self.vram_reserved > self.vram_estimate

    def where(self) -> str:
        m = self.measured
        return f"{m.node}:{','.join(map(str, m.gpus))}" if m.gpus else m.node

    def text(self, model: str) -> str:
        """`chat: measured 9.8 GiB VRAM on workstation:0, estimate 9.4 GiB (reserved 10.3 GiB)`."""
        parts = []
        m = self.measured
        if m.vram_bytes is not None and self.vram_reserved > self.vram_estimate:
            parts.append(
                f"measured {precise_gib(m.vram_bytes)} VRAM on {self.where()},"
                f" estimate {precise_gib(self.vram_estimate)} (reserved {precise_gib(self.vram_reserved)})"
            )
        if m.ram_bytes is not None and self.ram_reserved > self.ram_estimate:
            parts.append(
                f"measured {precise_gib(m.ram_bytes)} RAM on {self.where()}, estimate {precise_gib(self.ram_estimate)}"
                f" (reserved {precise_gib(self.ram_reserved)})"
            )
        return f"{model}: " + "; ".join(parts)


def precise_gib(n: int) -> str:
    """GiB with two decimals; MiB below 1 GiB, where two decimals of a GiB say little."""
    return f"{n / (1 << 30):.2f} GiB" if abs(n) >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def with_measured_margin(n: int) -> int:
    return math.ceil(n * (1 + MEASURED_MARGIN))


def calibrate_curve(curve: LayerCurve, m: Measured) -> tuple[LayerCurve, Calibration]:
    """`curve` with the fixed parts of the measured offload's regime raised so that it reserves at least the
    measured figures plus the margin there; never lowered. VRAM is raised only for a replica on one GPU (a
    split replica's per-GPU share is not measured)."""
    ngl = min(max(m.gpu_layers, 0), curve.layers + 1)
    regime = curve.regime(ngl)
    ram_est, vram_est = curve.ram(ngl), curve.vram(ngl)
    cpu_fixed = list(curve.cpu_fixed)
    gpu_fixed = list(curve.gpu_fixed)
    if m.ram_bytes is not None:
        cpu_fixed[regime] += max(0, with_measured_margin(m.ram_bytes) - ram_est)
    if m.vram_bytes is not None and len(m.gpus) == 1 and ngl > 0:
        gpu_fixed[regime] += max(0, with_measured_margin(m.vram_bytes) - vram_est)
    raised = replace(
        curve,
        cpu_fixed=(cpu_fixed[0], cpu_fixed[1], cpu_fixed[2]),
        gpu_fixed=(gpu_fixed[0], gpu_fixed[1], gpu_fixed[2]),
    )
    return raised, Calibration(m, ram_est, vram_est, raised.ram(ngl), raised.vram(ngl))


def calibrated(profile: MemoryProfile, measured: Sequence[Measured]) -> MemoryProfile:
    """The profile with each measured node's curve raised (`calibrate_curve`); unchanged where every measurement
    is within the estimate and margin."""
    curves = dict(profile.node_curves)
    notes = dict(profile.calibrated)
    for m in sorted(measured, key=lambda m: (m.node, m.gpu_layers)):
        curve, note = calibrate_curve(curves.get(m.node, profile.curve), m)
        if note.raised:
            curves[m.node] = curve
            notes[m.node] = note
    if not notes:
        return profile
    # A curve recomputed at another context (explanations) would drop the measurement: keep the raised one.
    params = {k: v for k, v in profile.node_params.items() if k not in notes}
    return replace(profile, node_curves=curves, calibrated=notes, node_params=params)


Profile = MemoryProfile | LayerCurve | NoEstimate
"""What `solver.place.place` accepts per model name."""


def declared_curve(
    memory: DeclaredMemory,
    layer_order: LayerOrder = LayerOrder.OUTPUT_FIRST,
    gpu_overhead: int = DEFAULT_GPU_OVERHEAD_BYTES,
) -> LayerCurve:
    """A linear curve from a declared `memory:` (VRAM at full offload, RAM, optional layers).

    With `layers: L`, the declared VRAM minus a fixed part (the node's GPU
    overhead, at most half the VRAM) is split evenly over L blocks and the output
    layer, so VRAM(ngl) = fixed + ngl · per_layer for either layer order, and the
    bytes leaving the GPU land in RAM. Without `layers` the model runs fully on a
    GPU or not at all (ngl ∈ {0, 1}). Running on the CPU only (ngl = 0) needs
    VRAM + RAM bytes of RAM.
    """
    vram, ram = memory.vram, memory.ram
    n = memory.layers or 0
    if n == 0:
        return LayerCurve(0, layer_order, (), (), (0, vram, vram), (vram + ram, ram, ram))
    fixed = min(gpu_overhead, vram // 2)
    per = math.ceil((vram - fixed) / (n + 1))
    full_fixed = vram - n * per
    # Partial regime: output-first has the output layer on the GPU plus ngl-1 blocks,
    # output-last has ngl blocks and the output on the CPU; both give fixed + ngl·per.
    partial_fixed = fixed + per if layer_order == LayerOrder.OUTPUT_FIRST else fixed
    cpu_top = ram + n * per
    return LayerCurve(
        layers=n,
        layer_order=layer_order,
        gpu_per_block=(per,) * n,
        cpu_per_block=(per,) * n,
        gpu_fixed=(0, partial_fixed, full_fixed),
        cpu_fixed=(vram + ram, cpu_top + (per if layer_order == LayerOrder.OUTPUT_LAST else 0), cpu_top),
    )


def declared_split_curve(memory: DeclaredMemory, gpu_overhead: int = DEFAULT_GPU_OVERHEAD_BYTES) -> SplitCurve | None:
    """A split curve from a declared `memory:` with `layers: L` (None without layers: nothing to split).

    The same reading as `declared_curve`: a fixed part (the GPU overhead, at most half the VRAM),
    taken to be needed again on every GPU of the split, and the rest evenly over L blocks and the
    output layer (the output's share takes the rounding), so one device holding everything needs
    exactly the declared VRAM.
    """
    n = memory.layers or 0
    if n == 0:
        return None
    vram = memory.vram
    fixed = min(gpu_overhead, vram // 2)
    per = math.ceil((vram - fixed) / (n + 1))
    return SplitCurve(
        block_bytes=(per,) * n,
        output_bytes=max(vram - fixed - n * per, 0),
        device_fixed=fixed,
        ram_bytes=memory.ram,
    )


def _split_nodes(spec: ClusterSpec, model: Model) -> list[Node]:
    if not model.placement.split or model.runtime is not Runtime.LLAMACPP:
        return []
    return [n for n in _candidate_nodes(spec, model) if len(n.gpus) >= 2]


def node_cpu_kind(node: Node | None) -> CpuKind:
    """The node's CPU kind from the features its spec states; UNKNOWN (plan for the CPU that needs the most
    RAM, so that a model placed on the CPU fits on any of them) when it states none."""
    if node is None or node.cpu is None:
        return CpuKind.UNKNOWN
    return cpu_kind(node.cpu.features)


class CpuSource(StrEnum):
    """Where the CPU a node's estimates are made for comes from."""

    SPEC = "spec"
    """The node's `cpu: {features: [...]}` (written by hand or by `homelab discover --write`)."""
    LOCAL_HOST = "local host"
    """The node is the machine homelab runs on and states no `cpu:`: this machine's /proc/cpuinfo."""
    ASSUMED = "assumed"
    """Nothing known: planned for the CPU kind that needs the most RAM for each model."""


@dataclass(frozen=True)
class PlannedCpu:
    """The CPU kind the estimates for one node are made for, and where it comes from."""

    kind: CpuKind
    source: CpuSource

    def describe(self) -> str:
        if self.source is CpuSource.ASSUMED:
            return "CPU assumed: the kind that needs the most RAM; state cpu: or run homelab discover --write"
        return f"CPU {self.kind.value} from the {self.source.value}"


def planned_cpus(spec: ClusterSpec, local: Mapping[str, Collection[str]] | None = None) -> dict[str, PlannedCpu]:
    """Per node, the CPU its estimates are for: the spec's `cpu:`; else, for a node in `local` (the nodes that
    are the machine homelab runs on, with that machine's flags, read by the caller), those flags; else UNKNOWN.
    Local flags that could not be read (empty) count as nothing known."""
    out: dict[str, PlannedCpu] = {}
    for node in spec.nodes:
        flags = (local or {}).get(node.name)
        if node.cpu is not None:
            out[node.name] = PlannedCpu(cpu_kind(node.cpu.features), CpuSource.SPEC)
        elif flags:
            out[node.name] = PlannedCpu(cpu_kind(flags), CpuSource.LOCAL_HOST)
        else:
            out[node.name] = PlannedCpu(CpuKind.UNKNOWN, CpuSource.ASSUMED)
    return out


def params_for(model: Model, node: Node | None, cpu: CpuKind | None = None) -> EstimateParams:
    """The estimator parameters of `model` when it runs on `node` (`cpu`: its CPU kind when known other than
    from the spec, see `planned_cpus`)."""
    order = node.llamacpp.layer_order if node is not None and node.llamacpp is not None else LayerOrder.OUTPUT_FIRST
    overhead = node.gpu_overhead if node is not None and node.gpu_overhead is not None else DEFAULT_GPU_OVERHEAD_BYTES
    return EstimateParams(
        ctx=model.context,
        cache_type=model.kv_cache,
        flash_attn=model.flash_attn,
        layer_order=order,
        gpu_overhead=overhead,
        cpu=cpu if cpu is not None else node_cpu_kind(node),
    )


def _runtime_nodes(spec: ClusterSpec, model: Model) -> list[Node]:
    """Every node with the model's runtime, with or without a GPU (its CPU sets the RAM at ngl = 0)."""
    return [n for n in spec.nodes if model.runtime in n.runtimes]


def _candidate_nodes(spec: ClusterSpec, model: Model) -> list[Node]:
    return [n for n in spec.nodes if model.runtime in n.runtimes and n.gpus]


OllamaInfo = tuple[Mapping[str, Any], str | None]
"""What Ollama's `/api/show` says of a pulled tag: (`model_info`, `details.quantization_level`)."""


def _node_params(spec: ClusterSpec, model: Model, cpus: Mapping[str, PlannedCpu] | None) -> dict[str, EstimateParams]:
    kinds = {name: c.kind for name, c in (cpus or {}).items()}
    return {n.name: params_for(model, n, kinds.get(n.name)) for n in _runtime_nodes(spec, model)}


def _shape_profile(
    spec: ClusterSpec, model: Model, shape: ModelShape, source: str, cpus: Mapping[str, PlannedCpu] | None
) -> MemoryProfile:
    default = params_for(model, None)
    node_params = _node_params(spec, model, cpus)
    return MemoryProfile(
        curve=layer_curve(shape, default),
        source=source,
        node_curves={name: layer_curve(shape, p) for name, p in node_params.items()},
        shape=shape,
        node_params=node_params,
    )


def profile_for(
    spec: ClusterSpec,
    model: Model,
    read_header: Callable[[str], GGUFHeader] | None,
    ollama_info: OllamaInfo | None = None,
    cpus: Mapping[str, PlannedCpu] | None = None,
) -> Profile:
    """The profile of one model: its GGUF header if readable, else its declared memory; for an
    Ollama model without `memory:`, the `model_info` Ollama reports for its pulled tag. `cpus` (see
    `planned_cpus`; default: the spec's `cpu:` alone) is the CPU each node's estimate is made for.

    A declared `memory:` wins over `model_info` for an Ollama model, so that the placement does not
    change once the tag has been pulled (the first reconcile pulls it, the second must plan nothing).
    """
    if model.runtime is Runtime.OLLAMA and model.memory is None and ollama_info is not None:
        try:
            info, quantization = ollama_info
            told = shape_from_model_info(info, quantization, model.name)
            return _shape_profile(spec, model, told, "ollama", cpus)
        except (GGUFError, EstimateError) as exc:
            return NoEstimate(f"no memory estimate: Ollama's model_info: {exc}")
    if model.runtime is Runtime.OLLAMA and model.memory is None:
        return NoEstimate(
            f"no memory estimate: '{model.source.ollama}' is pulled on no Ollama node that answered,"
            " and no `memory:` is declared"
        )
    if model.runtime is Runtime.LLAMACPP and model.source.gguf is not None and read_header is not None:
        try:
            shape = shape_from_header(read_header(model.source.gguf), model.name)
        except (GGUFError, OSError, EstimateError):
            shape = None
        if shape is not None:
            default = params_for(model, None)
            node_params = _node_params(spec, model, cpus)
            try:
                return MemoryProfile(
                    curve=layer_curve(shape, default),
                    source="gguf",
                    node_curves={name: layer_curve(shape, p) for name, p in node_params.items()},
                    shape=shape,
                    node_params=node_params,
                    node_splits={n.name: split_curve(shape, node_params[n.name]) for n in _split_nodes(spec, model)},
                )
            except EstimateError as exc:
                if model.memory is None:
                    return NoEstimate(f"no memory estimate: {exc}")
    if model.memory is not None:
        nodes = _candidate_nodes(spec, model)
        node_curves = {
            n.name: declared_curve(
                model.memory,
                params_for(model, n).layer_order,
                params_for(model, n).gpu_overhead,
            )
            for n in nodes
        }
        splits: dict[str, SplitCurve] = {}
        for n in _split_nodes(spec, model):
            sc = declared_split_curve(model.memory, params_for(model, n).gpu_overhead)
            if sc is not None:
                splits[n.name] = sc
        return MemoryProfile(
            curve=declared_curve(model.memory), source="declared", node_curves=node_curves, node_splits=splits
        )
    return NoEstimate()


def profiles_for(
    spec: ClusterSpec,
    read_header: Callable[[str], GGUFHeader] | None = None,
    ollama_info: Mapping[str, OllamaInfo] | None = None,
    measured: Mapping[str, Sequence[Measured]] | None = None,
    cpus: Mapping[str, PlannedCpu] | None = None,
) -> dict[str, Profile]:
    """A profile for every model of the spec (pass `solver.gguf.read_header` to read local GGUFs, and
    `ollama_info` — model name → what /api/show says of its tag — for Ollama models). `measured` (model name →
    what its replicas really held, for an unchanged configuration) raises the curves of the nodes measured:
    the placement reserves max(estimate, measured + margin) there. `cpus` (`planned_cpus`; default: the spec's
    `cpu:` alone, the other nodes UNKNOWN) is the CPU each node's estimates are made for."""
    info = ollama_info or {}
    out: dict[str, Profile] = {}
    for m in spec.models:
        profile = profile_for(spec, m, read_header, info.get(m.name), cpus)
        seen = (measured or {}).get(m.name)
        out[m.name] = calibrated(profile, seen) if seen and isinstance(profile, MemoryProfile) else profile
    return out


def as_profile(profile: Profile) -> MemoryProfile | NoEstimate:
    """Normalise what a caller passed: a bare LayerCurve is a profile valid on every node."""
    if isinstance(profile, LayerCurve):
        return MemoryProfile(curve=profile, source="curve")
    return profile
