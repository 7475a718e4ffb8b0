"""The command line's output on the example and the lab spec, byte for byte (golden files).

Each command runs as `python -m controller ...` in a network namespace of its own (`unshare --net`:
the example's 192.168.x nodes and the lab's loopback addresses are all unreachable there at once, and no
packet leaves the machine), with HOME, the state directory and the terminal width fixed, so what it
prints depends only on the code and the spec. The files were captured before the controller was split
into core/drivers/effects/commands and the split left every byte as it was; a change to any output
now shows here as a diff.

    HOMELAB_UPDATE_GOLDEN=1 python -m pytest tests/golden    # rewrite the files after a deliberate change
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "data" / "golden"
SPECS = {"example": "examples/homelab.yaml", "lab": "examples/lab/cluster.yaml"}
COMMANDS: dict[str, list[str]] = {
    "validate": ["validate"],
    "validate-json": ["validate", "--json"],
    "place": ["place"],
    "place-json": ["place", "--json"],
    "dry-run": ["reconcile", "--dry-run"],
    "dry-run-json": ["reconcile", "--dry-run", "--json"],
    "route": ["route", "--no-health", "write a python function to parse json"],
    "route-json": ["route", "--json", "--no-health", "what is 2+2"],
}
LAB_ONLY = {  # the example's desktop reaches unix:///var/run/docker.sock, which a machine may have
    "status": ["status"],
    "health": ["health"],
}
CASES = [(s, c) for s in SPECS for c in COMMANDS] + [("lab", c) for c in LAB_ONLY]


def run(spec: str, args: list[str], tmp: Path) -> str:
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to run the commands without a network")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent-homelab-golden-home",
        "HOMELAB_STATE_DIR": str(tmp / "state"),
        "COLUMNS": "120",
        "NO_COLOR": "1",
        "TERM": "dumb",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-m", "controller", *args, "-f", SPECS[spec]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    if "unshare failed" in done.stderr or "Operation not permitted" in done.stderr.splitlines()[0:1]:
        pytest.fail(f"unshare --net needs root here: {done.stderr.strip()}")
    return f"exit {done.returncode}\n--- stdout\n{done.stdout}--- stderr\n{done.stderr}"


@pytest.mark.parametrize(("spec", "command"), CASES, ids=[f"{s}-{c}" for s, c in CASES])
def test_output_is_unchanged(spec: str, command: str, tmp_path: Path) -> None:
    got = run(spec, {**COMMANDS, **LAB_ONLY}[command], tmp_path)
    path = GOLDEN / f"{spec}-{command}.txt"
    if os.environ.get("HOMELAB_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(got, encoding="utf-8")
    assert path.exists(), f"no golden file {path.name}: run with HOMELAB_UPDATE_GOLDEN=1"
    assert got == path.read_text(encoding="utf-8")
