"""The one way tests replace homelab's seams: a `Wiring` with fakes, handed to the CLI as Typer's context object.

    def test_x(wired: Wired) -> None:              # the `wired` fixture (tests/conftest.py)
        wired.set(connect=lambda spec: fake_connect, gpu_probe=lambda nodes: {})
        code, out, err = wired.run("reconcile", "--dry-run")
        worker = Worker(..., wiring=wired.wiring)     # the watch loop and recovery take it the same way

No module global is patched: `controller.commands.common.wiring_of` reads the context object, and
everything below the commands is handed the wiring.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from typer.testing import CliRunner, Result

from controller.cli import app
from controller.core.resolve import resolve
from controller.core.routing import Endpoint, endpoints_from_state
from controller.core.state import ClusterState
from controller.drivers.base import DockerNode, OllamaNode
from controller.drivers.gpu import GpuProbe
from controller.effects.engine import DEFAULT_SOLVE, GatewayFactory, Prepared, Session, Wiring
from solver.gguf import read_header
from solver.place import SolveParams
from specs.model import ClusterSpec, Node


class Wired:
    def __init__(self, wiring: Wiring | None = None) -> None:
        # ports held on this machine: none (the test specs' loopback ports may be another test's or lab's);
        # a test of that check sets `port_holder` itself
        self.wiring = wiring or Wiring(port_holder=lambda address, port: None)

    def set(self, **seams: Any) -> Wiring:
        """Replace some seams (the others stay as they are); the new wiring."""
        self.wiring = dataclasses.replace(self.wiring, **seams)
        return self.wiring

    def invoke(self, args: Sequence[str], **kwargs: Any) -> Result:
        """`homelab ARGS` in this process with this wiring (click's Result: exit code, stdout, stderr)."""
        return CliRunner().invoke(app, list(args), obj=self.wiring, **kwargs)

    def run(self, *args: str, **kwargs: Any) -> tuple[int, str, str]:
        """`homelab ARGS`: exit code, stdout, stderr; an exception other than SystemExit is raised again."""
        result = self.invoke(args, **kwargs)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr


TEST_SOLVE = SolveParams(time_limit=5, workers=1)


def prepare(
    spec: ClusterSpec,
    connect: Callable[[Node], DockerNode],
    params: SolveParams = TEST_SOLVE,
    *,
    state: Path | None = None,
    gpu_probe: GpuProbe | None = None,
    ollama: Callable[[Node], OllamaNode] | None = None,
    gateway: GatewayFactory | None = None,
) -> Prepared:
    """One plan through a `Session` (as `reconcile` makes it) over these drivers: `state` (default: an empty
    directory) holds the stored measurements and sha256s; without `gpu_probe` the GPUs are not probed, without
    `gateway` the gateway is neither observed nor planned."""
    wiring = Wiring(
        connect=lambda _spec: connect,
        ollama=ollama,
        gateway=(lambda _dir: gateway) if gateway is not None else None,
        gpu_probe=gpu_probe if gpu_probe is not None else (lambda _nodes: {}),
        solve=params,
        port_holder=lambda address, port: None,  # as `Wired`: a test of that check sets it itself
    )
    with (
        tempfile.TemporaryDirectory(prefix="homelab-state-") as empty,
        Session(spec, wiring, state if state is not None else Path(empty)) as session,
    ):
        return session.prepare(gateway=gateway is not None, gpus=gpu_probe is not None)


def desired_of(spec: ClusterSpec, observed: ClusterState | None = None) -> ClusterState:
    """The desired state as `Session.resolve` works it out, with no stored measurement (`observed`: the containers
    seen running keep their place and port). Raises RenderError/GatewayError."""
    return resolve(spec, params=DEFAULT_SOLVE, observed=observed, read_header=read_header).state()


def endpoints_of(spec: ClusterSpec, observed: ClusterState | None = None) -> dict[str, tuple[Endpoint, ...]]:
    """model → the endpoints of its placed replicas (`desired_of`)."""
    return endpoints_from_state(spec, desired_of(spec, observed))
