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
from collections.abc import Sequence
from typing import Any

from typer.testing import CliRunner, Result

from controller.cli import app
from controller.effects.engine import Wiring


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
