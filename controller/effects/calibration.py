"""Calibration from what ran: what each managed model server really holds, kept in the state directory.

After an apply, and at each run of `homelab watch`, every running managed llama.cpp container is measured (a
plan — `reconcile --dry-run`, `place`, `status` — reads the file and never writes it): its host memory through
Docker's stats API (`DockerNode.container_memory`, what `docker stats` shows) and, on a node whose GPUs were
probed, the VRAM nvidia-smi reports for its processes (`gpu_use.actual_vram`). The peak per container is kept in
`STATE_DIR/measured.json` (written atomically), keyed by node, model, replica and the container's config hash:

- a measurement counts only while the container it was taken from still runs with that config hash, and the
  spec still renders the same configuration for the model on that node (`spec_digest`: the config less what
  the placement chooses — GPUs, GPU layers, port): a changed config discards it;
- the next placement reserves max(estimate, measured + margin) for it (`controller.core.resolve`), which only
  raises a reservation: a model that still fits where it runs stays there, so an unchanged cluster still plans
  nothing; one that no longer fits is moved, with a warning (`solver.explain.calibration_lines`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from controller.core.measured import Measurement as Measurement
from controller.core.measured import current, spec_digest
from controller.core.state import ClusterState
from controller.drivers.base import DockerNode, DriverError
from controller.effects.gpu_use import GpuReality, actual_vram, managed_pids
from controller.effects.statefile import NUMBER, read_json, set_aside
from solver.profiles import MemoryProfile, Profile, as_profile, precise_gib
from specs.files import atomic_write
from specs.model import ClusterSpec, Node

MEASURED_FILE = "measured.json"
MEASURED_SHAPE: dict[str, Any] = {
    "version": int,
    "measurements": [
        {
            "node": str, "model": str, "replica": int, "container": str, "config_hash": str, "spec_digest": str,
            "gpu_layers": int, "gpus": [int], "ram_bytes": NUMBER, "vram_bytes": NUMBER,
        }
    ],
}  # fmt: skip
"""measured.json as `read` needs it (`statefile.check`; a missing key is caught by `Measurement.from_json`)."""

AFTER_APPLY_ATTEMPTS = 3
"""Stats samples tried per container right after an apply before it is left to the next observe (a figure was
missing once under load in CI)."""


def _peak(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def path_in(state_dir: Path) -> Path:
    return state_dir / MEASURED_FILE


def read(state_dir: Path) -> list[Measurement]:
    """The measurements kept in the state directory; none when the file is missing or unreadable (they are
    taken again at the next observation)."""
    path = path_in(state_dir)
    data = read_json(path, MEASURED_SHAPE)
    if not isinstance(data, dict):
        return []
    try:
        return [Measurement.from_json(d) for d in data.get("measurements") or []]
    except (KeyError, ValueError, TypeError) as exc:
        set_aside(path, f"a measurement without {exc}" if isinstance(exc, KeyError) else str(exc))
        return []


def write(state_dir: Path, measurements: Sequence[Measurement]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    data = {"version": 1, "measurements": [m.to_json() for m in sorted(measurements, key=lambda m: m.key)]}
    atomic_write(path_in(state_dir), json.dumps(data, indent=2) + "\n", keep_previous=False)


def measure(
    spec: ClusterSpec,
    observed: ClusterState,
    connect: Callable[[Node], DockerNode],
    gpus: GpuReality | None,
    *,
    attempts: int = 1,
    pause: Callable[[float], None] = time.sleep,
) -> list[Measurement]:
    """Measure every running managed container of the reachable Docker nodes (a node that fails gives none).

    With `attempts` > 1 (after an apply), the containers that gave no host-memory figure, or whose engine failed,
    are asked again in up to `attempts` - 1 more passes, a second apart (a container started a moment ago, an
    engine slow under load); so a node whose engine never gives one costs at most that many seconds, not that
    many per container."""
    pids = managed_pids(spec, observed, connect) if gpus is not None else {}
    out: list[Measurement] = []
    for node in spec.nodes:
        state = observed.nodes.get(node.name)
        if state is None or not state.reachable or node.docker is None:
            continue
        report = gpus.reports.get(node.name) if gpus is not None else None
        # a swap pool holds whichever members are loaded: not one model's figure
        todo = [c for c in state.containers if c.status == "running" and c.config is not None and not c.pool]
        ram: dict[str, int] = {}
        for attempt in range(max(1, attempts)):
            if attempt:
                pause(1.0)
            try:
                engine = connect(node)
                for c in todo:
                    if c.name not in ram and (got := engine.container_memory(c.name)) is not None:
                        ram[c.name] = got
            except DriverError:
                continue
            if len(ram) == len(todo):
                break
        for c in todo:
            assert c.config is not None
            vram = actual_vram(report, pids.get(node.name, {}).get(c.name, frozenset())) if c.on_gpu else None
            if c.name not in ram and vram is None:
                continue
            out.append(
                Measurement(
                    node.name,
                    c.model,
                    c.replica,
                    c.name,
                    c.config_hash,
                    spec_digest(c.config),
                    c.config.gpu_layers,
                    c.config.gpus,
                    ram.get(c.name),
                    vram,
                )
            )
    return out


def merge(kept: Iterable[Measurement], new: Iterable[Measurement], observed: ClusterState) -> list[Measurement]:
    """The peak per container and config hash; a kept measurement of a container that an observed node no longer
    runs with that config hash is dropped (a node not observed keeps its own)."""
    out: dict[tuple[str, str, int, str], Measurement] = {}
    for m in kept:
        state = observed.nodes.get(m.node)
        if (
            state is not None
            and state.reachable
            and not any(
                (c.model, c.replica, c.config_hash) == (m.model, m.replica, m.config_hash) for c in state.containers
            )
        ):
            continue
        out[m.key] = m
    for m in new:
        old = out.get(m.key)
        out[m.key] = (
            m
            if old is None
            else replace(m, ram_bytes=_peak(old.ram_bytes, m.ram_bytes), vram_bytes=_peak(old.vram_bytes, m.vram_bytes))
        )
    return sorted(out.values(), key=lambda m: m.key)


def record(
    state_dir: Path,
    spec: ClusterSpec,
    observed: ClusterState,
    connect: Callable[[Node], DockerNode],
    gpus: GpuReality | None,
    *,
    attempts: int = 1,
) -> list[Measurement]:
    """Measure, merge with what the state directory keeps, write it back when it changed; return the result.

    The file is advisory: a state directory that cannot be written leaves the measurements in memory only."""
    kept = read(state_dir)
    merged = merge(kept, measure(spec, observed, connect, gpus, attempts=attempts), observed)
    if merged != sorted(kept, key=lambda m: m.key):
        with contextlib.suppress(OSError):
            write(state_dir, merged)
    return merged


# --------------------------------------------------------------------------- homelab status


@dataclass(frozen=True)
class ContainerCalibration:
    """Estimate and measured figures of one running container (at its offload on its node)."""

    ram_estimate: int | None
    ram_measured: int | None
    vram_estimate: int | None
    vram_measured: int | None

    def lines(self) -> list[str]:
        out = []
        for what, est, got in (
            ("RAM", self.ram_estimate, self.ram_measured),
            ("VRAM", self.vram_estimate, self.vram_measured),
        ):
            if got is None:
                continue
            text = f"{what} estimate {precise_gib(est) if est is not None else 'unknown'}, measured {precise_gib(got)}"
            if est:
                text += f" ({_signed_gib(got - est)}, {got / est - 1:+.0%})"
            out.append(text)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "ram_estimate_bytes": self.ram_estimate,
            "ram_measured_bytes": self.ram_measured,
            "ram_measured_minus_estimate_bytes": _diff(self.ram_measured, self.ram_estimate),
            "vram_estimate_bytes": self.vram_estimate,
            "vram_measured_bytes": self.vram_measured,
            "vram_measured_minus_estimate_bytes": _diff(self.vram_measured, self.vram_estimate),
        }


def _diff(a: int | None, b: int | None) -> int | None:
    return a - b if a is not None and b is not None else None


def _signed_gib(n: int) -> str:
    return f"{'+' if n >= 0 else '-'}{precise_gib(abs(n))}"


def estimate_vs_measured(
    spec: ClusterSpec,
    observed: ClusterState,
    measurements: Iterable[Measurement],
    profiles: Mapping[str, Profile],
) -> dict[tuple[str, str], ContainerCalibration]:
    """(node, container) → estimate and measured figures, for every container measured with its current config
    (`profiles`: the uncalibrated estimates, `profiles_for` without `measured`)."""
    out: dict[tuple[str, str], ContainerCalibration] = {}
    for m in current(measurements, observed):
        profile = profiles.get(m.model)
        ram_est: int | None = None
        vram_est: int | None = None
        known = as_profile(profile) if profile is not None else None
        if isinstance(known, MemoryProfile):
            curve = known.for_node(m.node)
            ngl = min(max(m.gpu_layers, 0), curve.layers + 1)
            ram_est, vram_est = curve.ram(ngl), (curve.vram(ngl) if ngl > 0 else None)
        out[m.node, m.container] = ContainerCalibration(ram_est, m.ram_bytes, vram_est, m.vram_bytes)
    return out
