"""`homelab gateway render`: the LiteLLM proxy config the spec and the placement give.

It observes the cluster as `homelab reconcile` does (so llama.cpp ports stay the
ones the containers have), places, and prints the config `reconcile` would
write. Nothing is written or changed.
"""

from __future__ import annotations

import sys

import typer

from controller.commands.common import SpecFileOption, fail, load_or_exit, spec_path, wiring_of
from controller.core.desired import RenderError
from controller.core.gateway_config import GatewayError
from controller.drivers.base import DriverError
from controller.effects.engine import Session


def register(app: typer.Typer) -> None:
    gateway = typer.Typer(help="The LiteLLM gateway in front of the cluster.", no_args_is_help=True)
    app.add_typer(gateway, name="gateway")

    @gateway.command()
    def render(ctx: typer.Context, file: SpecFileOption = None) -> None:
        """Print the LiteLLM proxy config (YAML) for the spec and the current placement."""
        spec = load_or_exit(spec_path(file)).spec
        if spec.gateway is None:
            fail("the spec has no `gateway` section")
        try:
            with Session(spec, wiring_of(ctx)) as session:
                desired = session.resolve().desired()  # placed as `reconcile` places; the gateway is not asked
        except (DriverError, RenderError, GatewayError) as exc:
            fail(str(exc))
        assert desired.gateway is not None and desired.gateway.text is not None
        sys.stdout.write(desired.gateway.text)
