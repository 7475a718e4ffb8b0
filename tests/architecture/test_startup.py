"""CLI start-up (issue 28, item 10): the light commands do not import the heavy libraries.

`homelab --version`, `--help`, `validate` and `schema` run in a fresh interpreter, as the console script runs
them, and none of `specs.lazy.HEAVY` (Docker's SDK, OR-Tools, deepdiff, asyncssh, paramiko, pandas) is in
`sys.modules` afterwards. Speed itself is measured in `bench/startup.py`, never asserted here.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from controller.drivers.base import SshFailed
from controller.drivers.ssh import SshShell
from specs.lazy import HEAVY, LazyModule
from specs.model import Node
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]

RUN = """
import json, sys
heavy = json.loads(sys.argv[2])
sys.argv = ["homelab", *json.loads(sys.argv[1])]
import controller.cli
code = 0
try:
    controller.cli.main()
except SystemExit as exc:
    code = exc.code
print("\\nLOADED " + json.dumps([m for m in heavy if m in sys.modules]) + " EXIT " + str(code))
"""


def loaded_after(*args: str) -> tuple[list[str], int]:
    """Run `homelab ARGS` as the console script does, in a fresh interpreter: (heavy modules loaded, exit status)."""
    done = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(list(args)), json.dumps(list(HEAVY))],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("LOADED "), done.stdout + done.stderr
    names, _, status = last.removeprefix("LOADED ").partition(" EXIT ")
    return json.loads(names), int(status)


@pytest.mark.parametrize(
    "args",
    [("--version",), ("--help",), ("validate", "-f", "examples/homelab.yaml"), ("schema",)],
    ids=["version", "help", "validate", "schema"],
)
def test_light_commands_import_no_heavy_library(args: tuple[str, ...]) -> None:
    loaded, status = loaded_after(*args)
    assert status == 0
    assert loaded == [], f"`homelab {' '.join(args)}` imported {loaded}"


def test_the_check_sees_a_heavy_import() -> None:
    """Not vacuous: a command that places does load OR-Tools (through the lazy module, on first use)."""
    loaded, status = loaded_after("place", "-f", "examples/homelab.yaml")
    assert status in (0, 1)
    assert "ortools" in loaded


def test_a_lazy_module_imports_on_first_use() -> None:
    lazy = LazyModule("json.decoder", "json.scanner")
    assert "not loaded yet" in repr(lazy)
    assert lazy.JSONDecodeError is json.JSONDecodeError
    assert "(loaded)" in repr(lazy)
    with pytest.raises(AttributeError):
        lazy.__wrapped__  # noqa: B018 - a dunder probe never loads or forwards


def test_ssh_errors_are_caught_through_the_lazy_asyncssh(tmp_path: Path) -> None:
    """asyncssh is imported by the first connect; its failure is still one located error, not a traceback."""
    known = tmp_path / "known_hosts"
    known.write_text("")
    port = free_port()
    node = Node.model_validate(
        {
            "name": "n",
            "tier": "remote",
            "address": "127.0.0.1",
            "ram": 1 << 30,
            "ssh": {"user": "u", "port": port, "known_hosts": str(known), "connect_timeout": 5},
            "ollama": {"url": "http://127.0.0.1:1"},
        }
    )

    async def connect() -> None:
        async with SshShell(node):
            pass

    with pytest.raises(SshFailed, match="connection refused"):
        asyncio.run(connect())
