"""An in-memory Ollama server for tests of the engine (the shipped fake, next to `fake.FakeDockerNode`).

It keeps the OllamaNode contract — a pull that fails leaves nothing, a derived
model exists only after a successful create, deleting a missing model is not
an error — and records every call in `calls`. Nothing is downloaded or run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from controller.core.state import OllamaModelState, ollama_tag
from controller.drivers.base import DriverError, NodeUnreachable, ProgressFn


@dataclass
class FakeOllamaNode:
    node: str
    registry: dict[str, int] = field(default_factory=dict)
    """Tags that can be pulled: tag → size in bytes."""
    models: dict[str, OllamaModelState | None] = field(default_factory=dict)
    """Models on the server: name → its derived state (None for a plain pulled tag)."""
    loaded_now: set[str] = field(default_factory=set)
    reachable: bool = True
    calls: list[tuple[str, str]] = field(default_factory=list)
    drop_pull: set[str] = field(default_factory=set)
    """Tags whose pull stream breaks half way (connection dropped)."""
    infos: dict[str, dict[str, object]] = field(default_factory=dict)
    """What /api/show says of a model: {"model_info": {...}, "details": {...}}."""

    def _check(self, method: str, name: str) -> None:
        if not self.reachable:
            raise NodeUnreachable(f"Ollama on {self.node} does not answer (ConnectError)")
        self.calls.append((method, name))

    def ping(self) -> None:
        self._check("ping", "")

    def list_models(self) -> list[str]:
        self._check("list_models", "")
        return sorted(self.models)

    def loaded(self) -> list[str]:
        self._check("loaded", "")
        return sorted(self.loaded_now)

    def derived(self, name: str) -> OllamaModelState:
        self._check("derived", name)
        state = self.models.get(name)
        if state is None:
            raise DriverError(f"model '{name}' not found")
        return replace(state, preload=False, keep_alive=None)

    def derived_many(self, names: Sequence[str]) -> list[OllamaModelState]:
        return [self.derived(name) for name in names]

    def model_info(self, name: str) -> dict[str, object]:
        self._check("model_info", name)
        if name not in self.models:
            raise DriverError(f"model '{name}' not found")
        return self.infos.get(name, {"model_info": {}, "details": {}})

    def pull(self, tag: str, progress: ProgressFn | None = None) -> None:
        self._check("pull", tag)
        tag = ollama_tag(tag)
        if tag not in self.registry:
            raise DriverError(f"pull {tag}: pull model manifest: file does not exist")
        size = self.registry[tag]
        if progress is not None:
            progress(size // 2, size)
        if tag in self.drop_pull:
            raise DriverError(f"pull {tag}: connection dropped before Ollama finished (last status: downloading)")
        if progress is not None:
            progress(size, size)
        self.models[tag] = None

    def create(self, desired: OllamaModelState) -> None:
        self._check("create", desired.name)
        if desired.base not in self.models:
            raise DriverError(f"create {desired.name} from {desired.base}: model '{desired.base}' not found")
        self.models[desired.name] = replace(desired, preload=False, keep_alive=None)

    def delete(self, name: str) -> None:
        self._check("delete", name)
        self.models.pop(name, None)
        self.loaded_now.discard(name)

    def preload(self, name: str, keep_alive: float | None) -> None:
        self._check("preload", name)
        if name not in self.models:
            raise DriverError(f"model '{name}' not found")
        self.loaded_now.add(name)
