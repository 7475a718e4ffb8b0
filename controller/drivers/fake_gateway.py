"""An in-memory LiteLLM gateway for tests of the engine: a config text, a proxy that is up or not.

It records every call in `calls`; `fail_on` names the methods that raise DriverError.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.core.state import GatewayState
from controller.drivers.base import DriverError


@dataclass
class FakeGateway:
    text: str | None = None
    running: bool = True
    restarts: int = 0
    container: str = ""
    """mode container: the spec-hash of the proxy's container ("" none); a restart re-creates it as desired."""
    calls: list[str] = field(default_factory=list)
    fail_on: set[str] = field(default_factory=set)

    def _check(self, method: str) -> None:
        self.calls.append(method)
        if method in self.fail_on:
            raise DriverError(f"gateway: {method} failed (injected)")

    def read_config(self) -> str | None:
        return self.text

    def alive(self) -> bool:
        return self.running

    def write_config(self, desired: GatewayState) -> None:
        self._check("write_config")
        self.text = desired.text

    def restart(self, desired: GatewayState) -> None:
        self._check("restart")
        self.restarts += 1
        self.running = True
        self.container = desired.run_hash

    def container_hash(self) -> str:
        return self.container

    def wait_live(self, desired: GatewayState, timeout: float) -> None:
        self._check("wait_live")
        if not self.running and desired.mode != "external":
            raise DriverError("gateway: /health/liveliness did not answer 200")
