"""What runs where: the one recipe every command uses (pure: the I/O is done by the caller and handed in).

    observed containers ─→ current placement and ports ─┐
    stored measurements (still running, unchanged) ──────┼─→ profiles ─→ place ─→ render ─→ Resolved
    foreign VRAM, Ollama model info, CPUs, solver settings ┘

`controller.effects.engine.Session.resolve()` gathers the inputs (observe, GPUs, the measurements kept in the
state directory, Ollama's /api/show) and calls `resolve`; `reconcile`, `watch`, recovery, `health`, `route`,
`wake`, `recover`, `status`, the status page, `place` and `gateway render` all go through it, so they all mean
the same placement, ports and endpoints. This module is the only caller of `solver.place.place`
(`tests/architecture/test_resolve.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from controller.core.desired import ollama_requirements, render, source_sizes
from controller.core.measured import Measurement, by_model, current, spec_digest
from controller.core.state import ClusterState
from solver.explain import calibration_lines
from solver.gguf import GGUFHeader
from solver.place import SolveParams, place
from solver.problem import CurrentAssignment, PlacementResult
from solver.profiles import OllamaInfo, PlannedCpu, Profile, profiles_for
from specs.errors import HomelabError
from specs.model import ClusterSpec

HeaderReader = Callable[[str], GGUFHeader]
"""Reads a local GGUF's header (`solver.gguf.read_header`): the one file read the estimates need."""


@dataclass(frozen=True)
class Resolved:
    """Where every replica goes, with which memory profile, rendered into the desired state."""

    placement: PlacementResult
    profiles: Mapping[str, Profile]
    """The profiles the placement used (measurements applied)."""
    desired: ClusterState | None
    """The desired state (None when it cannot be rendered: `error` says why)."""
    error: HomelabError | None = None
    """Why the placement cannot be rendered (RenderError, GatewayError)."""
    calibration: tuple[str, ...] = ()
    """One line per model whose reservation a measurement raised ("measured … on node:0, estimate …")."""
    warnings: tuple[str, ...] = ()
    """Running replicas measured above their estimate that no longer fit where they run."""
    notes: tuple[str, ...] = ()
    """What nodes must be set to that homelab does not set itself (an Ollama node's OLLAMA_MAX_LOADED_MODELS)."""
    measurements: tuple[Measurement, ...] = ()
    """The measurements the profiles were raised with."""

    def state(self) -> ClusterState:
        """The desired state; raises the rendering's error (RenderError, GatewayError) when there is none."""
        if self.desired is None:
            assert self.error is not None
            raise self.error
        return self.desired


def current_placement(observed: ClusterState) -> dict[tuple[str, int], CurrentAssignment]:
    """Where managed replicas run now, for the solver's stability objective."""
    out: dict[tuple[str, int], CurrentAssignment] = {}
    for node in observed.nodes.values():
        for c in node.containers:
            if c.config is None:
                continue  # unreadable config label: its place is unknown, and it will be replaced anyway
            gpus = c.config.gpus
            for m in c.config.members:  # a swap pool's members are where their pool is
                out[m.model, 0] = CurrentAssignment(
                    node.node, gpus, m.gpu_layers, any_gpu=not gpus and m.gpu_layers > 0
                )
            if not c.pool:
                layers = c.config.gpu_layers
                out[c.model, c.replica] = CurrentAssignment(node.node, gpus, layers, any_gpu=not gpus and layers > 0)
    return out


def current_ports(observed: ClusterState) -> dict[tuple[str, str], int]:
    """(node, container) → the port it listens on now, so that a replica that stays keeps its port."""
    return {(node.node, c.name): c.config.port for node in observed.nodes.values() for c in node.containers if c.config}


def resolve(
    spec: ClusterSpec,
    *,
    params: SolveParams,
    observed: ClusterState | None = None,
    measurements: Sequence[Measurement] = (),
    foreign_vram: Mapping[tuple[str, int], int] | None = None,
    read_header: HeaderReader | None = None,
    ollama_info: Mapping[str, OllamaInfo] | None = None,
    cpus: Mapping[str, PlannedCpu] | None = None,
) -> Resolved:
    """Place and render the spec.

    `observed` (None: not observed): replicas stay where they run and keep their ports, and only the
    measurements of containers still running with their config hash count (without it, every measurement given
    counts). `foreign_vram` ((node, GPU) → bytes held by other processes) is left alone. A measurement whose model
    the spec now configures differently on its node (its `spec_digest` differs from the rendered container's) is
    discarded and the placement made again. The desired state is rendered once per placement made."""
    running = current_placement(observed) if observed is not None else None
    ports = current_ports(observed) if observed is not None else None
    sizes = source_sizes(observed) if observed is not None else None
    used = list(current(measurements, observed) if observed is not None else measurements)
    while True:
        profiles = profiles_for(
            spec, read_header=read_header, ollama_info=ollama_info, measured=by_model(used), cpus=cpus
        )
        placement = place(spec, profiles, current=running, foreign_vram=foreign_vram, params=params)
        try:
            desired: ClusterState | None = render(spec, placement, ports, sizes)
            error: HomelabError | None = None
        except HomelabError as exc:  # RenderError, GatewayError: the caller reports it
            desired, error = None, exc
        keep = used if desired is None else _unchanged(used, desired)
        if len(keep) == len(used):
            break
        used = keep
    lines, warnings = calibration_lines(profiles, placement, running)
    notes = tuple(ollama_requirements(spec, placement))
    return Resolved(placement, profiles, desired, error, lines, warnings, notes, tuple(used))


def _unchanged(measurements: Sequence[Measurement], desired: ClusterState) -> list[Measurement]:
    """The measurements whose model the desired state configures on their node as when they were taken."""
    rendered = {
        (n.node, c.model): spec_digest(c.config)
        for n in desired.nodes.values()
        for c in n.containers
        if c.config is not None
    }
    return [m for m in measurements if rendered.get((m.node, m.model), m.spec_digest) == m.spec_digest]
