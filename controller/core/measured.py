"""What a managed container was measured holding, as the placement uses it (pure: no I/O).

`controller.effects.calibration` takes the measurements and keeps them in the state directory;
`controller.core.resolve` applies them to the profiles.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from controller.core.state import ClusterState, ContainerConfig
from solver.profiles import Measured

PLACEMENT_ARGS = {"--port", "-ngl", "--split-mode", "--tensor-split"}
"""llama-server options whose value the placement chooses (each followed by its value)."""


def spec_digest(config: ContainerConfig) -> str:
    """The digest of a container config less what the placement chooses (GPUs, GPU layers, port, restart
    policy): it changes only when the spec changes the model's configuration on that node."""
    command: list[str] = []
    skip = False
    for arg in config.command:
        if skip:
            skip = False
            continue
        if arg in PLACEMENT_ARGS:
            skip = True
            continue
        command.append(arg)
    fixed = replace(config, command=tuple(command), gpu_layers=0, gpus=(), gpu_access="", port=0, restart_policy="")
    return fixed.digest()


@dataclass(frozen=True)
class Measurement:
    """The most a managed container was seen holding while it ran with `config_hash`."""

    node: str
    model: str
    replica: int
    container: str
    config_hash: str
    spec_digest: str
    gpu_layers: int
    gpus: tuple[int, ...]
    ram_bytes: int | None
    vram_bytes: int | None

    @property
    def key(self) -> tuple[str, str, int, str]:
        return (self.node, self.model, self.replica, self.config_hash)

    def measured(self) -> Measured:
        return Measured(self.node, self.gpu_layers, self.gpus, self.ram_bytes, self.vram_bytes)

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "model": self.model,
            "replica": self.replica,
            "container": self.container,
            "config_hash": self.config_hash,
            "spec_digest": self.spec_digest,
            "gpu_layers": self.gpu_layers,
            "gpus": list(self.gpus),
            "ram_bytes": self.ram_bytes,
            "vram_bytes": self.vram_bytes,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Measurement:
        def size(v: object) -> int | None:
            return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

        return cls(
            node=str(d["node"]),
            model=str(d["model"]),
            replica=int(d["replica"]),
            container=str(d["container"]),
            config_hash=str(d["config_hash"]),
            spec_digest=str(d["spec_digest"]),
            gpu_layers=int(d["gpu_layers"]),
            gpus=tuple(int(g) for g in d.get("gpus", ())),
            ram_bytes=size(d.get("ram_bytes")),
            vram_bytes=size(d.get("vram_bytes")),
        )


def current(measurements: Iterable[Measurement], observed: ClusterState) -> list[Measurement]:
    """The measurements of containers that still run with the config hash they were measured with."""
    running = {
        (node.node, c.model, c.replica, c.config_hash)
        for node in observed.nodes.values()
        for c in node.containers
        if c.status == "running"
    }
    return [m for m in measurements if m.key in running]


def by_model(measurements: Iterable[Measurement]) -> dict[str, list[Measured]]:
    out: dict[str, list[Measured]] = {}
    for m in measurements:
        out.setdefault(m.model, []).append(m.measured())
    return out
