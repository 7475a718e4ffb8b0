"""Calibration against a real dockerd and a real llama-server container on the CPU (issue 19, part 3).

After the apply, Docker's stats give the container's real host memory, kept in the state directory;
`homelab status` shows it beside the estimate, and the next plan (which reserves max(estimate, measured + margin))
still plans nothing. On this synthetic GGUF the measured figure is below the GGUF estimate (about 17 vs 24 MiB here).

The second test has the measured figure above the estimate: the same server, but the controller cannot read the
GGUF header (it runs, through `unshare`, where the node's model directory is empty, as on another machine than the
node) and plans with the model's declared `memory:`, which under-declares it (6 MiB on the CPU; about 17 MiB
measured). The measurement is shown, reserved with its margin by `homelab place` and the next plan, the plan stays
empty, a node too small for the measured figure gets the warning, and a changed context drops the measurement.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from controller.drivers.docker import stats_memory
from controller.effects import calibration
from solver.profiles import with_measured_margin
from tests.support import dockerd as dockerd_support
from tests.support.ports import free_port_range
from tests.support.wiring import Wired

SPEC = """\
cluster: {{name: {cluster}}}
nodes:
  - name: box
    tier: cpu
    address: 127.0.0.1
    docker: {{endpoint: "{endpoint}", gpu_access: none}}
    ram: 16GiB
    llamacpp:
      image: "{image}"
      helper_image: "{helper}"
      ports: {base}-{top}
      bind_address: 127.0.0.1
      threads: 1
      volume: hl-models
      health_timeout: 60s
models:
  - name: alpha
    runtime: llamacpp
    source: {{gguf: {models}/alpha.gguf}}
    context: 512
    placement: {{cpu_only: true}}
    args: {extra}
"""

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
EXTRA = '["--load-mode", "none"]'
"""Read the weights into the process's own memory instead of mapping the file (the page cache is not counted)."""


def test_measured_host_memory_is_kept_shown_and_reserved(
    dockerd: dockerd_support.Dockerd,
    docker_client: docker.DockerClient,
    busybox_image: str,
    llamacpp_image: str,
    small_gguf: Path,
    cluster: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    wired: Wired,
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(small_gguf, models / "alpha.gguf")
    base = free_port_range(4)
    (tmp_path / "cluster.yaml").write_text(
        SPEC.format(
            cluster=cluster,
            endpoint=dockerd.url,
            image=llamacpp_image,
            helper=busybox_image,
            base=base,
            top=base + 3,
            models=models,
            extra=EXTRA,
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    wired.set(gpu_probe=lambda nodes: {})
    try:
        code, out, err = wired.run("reconcile", "--yes")
        assert code == 0, out + err
        [kept] = json.loads((tmp_path / "state" / calibration.MEASURED_FILE).read_text())["measurements"]
        container = docker_client.containers.get("homelab-alpha")
        assert kept["config_hash"] == container.labels["homelab.spec-hash"]
        now = stats_memory(docker_client.api.stats(container.id, stream=False, one_shot=True))
        assert now is not None and kept["ram_bytes"] is not None
        assert abs(now - kept["ram_bytes"]) < 0.25 * now  # the figure kept is Docker's, give or take the server's churn
        code, out, err = wired.run("status", "--json")
        assert code == 0, err
        [alpha] = json.loads(out)["nodes"]["box"]["containers"]
        figures = alpha["measured"]
        assert figures["ram_measured_bytes"] >= kept["ram_bytes"]  # the peak is kept
        assert (
            figures["ram_measured_minus_estimate_bytes"]
            == figures["ram_measured_bytes"] - figures["ram_estimate_bytes"]
        )
        code, out, err = wired.run("status")
        assert "    RAM estimate " in out and ", measured " in out
        code, out, err = wired.run("reconcile", "--dry-run")
        assert code == 0, out + err
        assert "No changes. The cluster matches the spec." in out
    finally:
        for c in docker_client.containers.list(all=True):
            c.remove(force=True)
        for v in docker_client.volumes.list():
            v.remove(force=True)


# --------------------------------------------------------------------------- measured above the estimate

UNDER_DECLARED = """\
cluster: {{name: {cluster}}}
nodes:
  - name: box
    tier: cpu
    address: 127.0.0.1
    docker: {{endpoint: "{endpoint}", gpu_access: none}}
    ram: {ram}
    llamacpp:
      image: "{image}"
      helper_image: "{helper}"
      ports: {base}-{top}
      bind_address: 127.0.0.1
      threads: 1
      volume: hl-models
      health_timeout: 60s
models:
  - name: tiny
    runtime: llamacpp
    source: {{gguf: {models}/tiny.gguf, node: box}}
    context: {context}
    placement: {{cpu_only: true}}
    memory: {{vram: 4MiB, ram: 2MiB}}
    args: {extra}
"""

DECLARED = 6 * MIB
"""What the under-declared `memory:` plans on the CPU: its VRAM and RAM together (a declared model at ngl 0)."""


def mib(n: int) -> str:
    """A figure below 1 GiB as homelab prints it."""
    assert n < 1 << 30
    return f"{n / MIB:.1f} MiB"


HIDE = 'mount -t tmpfs -o size=1m homelab-elsewhere "$0" && test ! -e "$0/tiny.gguf" && exec "$@"'
"""Run a command in a mount namespace of its own where `$0` (the models directory) is an empty tmpfs."""


def elsewhere(hidden: Path, cwd: Path, *args: str) -> tuple[int, str, str]:
    """`homelab ARGS` as a controller on another machine than the node's: in a mount namespace of its own where the
    node's model directory (`hidden`) is empty, so that it cannot read the GGUF header and plans with the model's
    declared `memory:`, while the node's dockerd (outside the namespace) copies the file from there as ever."""
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", HIDE, str(hidden)]
    command += [sys.executable, "-c", "from controller.cli import main; main()", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def test_measured_above_an_under_declared_estimate_is_reserved_and_shown(
    dockerd: dockerd_support.Dockerd,
    docker_client: docker.DockerClient,
    busybox_image: str,
    llamacpp_image: str,
    small_gguf: Path,
    cluster: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model whose spec declares less memory than its server really holds (the controller cannot read the GGUF
    header: the file is on the node, not on the controller's machine): the measurement is kept, shown above the
    estimate by `homelab status`, reserved by `homelab place` and the next plan (max(estimate, measured · 1.05)),
    the plan stays empty; a node too small for the measured figure gets a warning; a changed context drops it."""
    why = None if shutil.which("unshare") else "unshare (util-linux) is not installed"
    if why is not None:
        if os.environ.get("HOMELAB_REQUIRE_REAL"):
            pytest.fail(f"this test needs {why}")
        pytest.skip(why)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(small_gguf, models / "tiny.gguf")
    base = free_port_range(4)
    spec = tmp_path / "cluster.yaml"

    def write_spec(ram: str | int = "16GiB", context: int = 512) -> None:
        spec.write_text(
            UNDER_DECLARED.format(
                cluster=cluster,
                endpoint=dockerd.url,
                ram=ram,
                image=llamacpp_image,
                helper=busybox_image,
                base=base,
                top=base + 3,
                models=models,
                context=context,
                extra=EXTRA,
            )
        )

    def homelab(*args: str) -> tuple[int, str, str]:
        return elsewhere(models, tmp_path, *args)

    def kept() -> int:
        [m] = json.loads((tmp_path / "state" / calibration.MEASURED_FILE).read_text())["measurements"]
        assert isinstance(m["ram_bytes"], int)
        return int(m["ram_bytes"])

    write_spec()
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(tmp_path / "state"))
    try:
        code, out, err = homelab("reconcile", "--yes")
        assert code == 0, out + err
        assert "box CPU: tiny (6.0 MiB RAM)" in out  # planned with the declared 6 MiB
        assert docker_client.containers.get("homelab-tiny").status == "running"
        first = kept()
        assert first > DECLARED  # the real server holds more than the spec says

        # `homelab status`: estimate (the declared figure), measured (the peak kept) and a positive difference.
        code, out, err = homelab("status", "--json")
        assert code == 0, err
        [tiny] = json.loads(out)["nodes"]["box"]["containers"]
        figures = tiny["measured"]
        assert figures["ram_estimate_bytes"] == DECLARED
        assert figures["ram_measured_bytes"] == kept() >= first
        assert figures["ram_measured_minus_estimate_bytes"] == figures["ram_measured_bytes"] - DECLARED > 0
        code, out, err = homelab("status")
        assert code == 0, err
        [line] = [s.strip() for s in out.splitlines() if "RAM estimate" in s]
        assert line.startswith("RAM estimate 6.0 MiB, measured ") and " (+" in line, out

        # `homelab place` (reads what status kept, measures nothing): the measured figure, reserved with the margin.
        peak = kept()
        reserved = max(DECLARED, with_measured_margin(peak))
        note = f"tiny: measured {mib(peak)} RAM on box, estimate {mib(DECLARED)} (reserved {mib(reserved)})"
        code, out, err = homelab("place", "--json")
        assert code == 0, out + err
        placed = json.loads(out)
        assert placed["measured"] == [note]
        [a] = placed["assignments"]
        assert (a["model"], a["node"], a["gpu_layers"], a["ram_bytes"]) == ("tiny", "box", 0, reserved)
        code, out, err = homelab("place")
        assert code == 0, out + err
        assert f"Measured:\n  {note}\n" in out

        # The next plan reserves it too, and plans nothing: the config is unchanged and the model still fits.
        code, out, err = homelab("reconcile", "--dry-run", "--json")
        assert code == 0, out + err
        plan = json.loads(out)
        peak = kept()  # what this plan measured and used (the peak only grows)
        reserved = with_measured_margin(peak)
        assert plan["steps"] == []
        [a] = plan["placement"]["assignments"]
        assert a["ram_bytes"] == reserved > DECLARED
        assert plan["calibration"] == {
            "measured": [f"tiny: measured {mib(peak)} RAM on box, estimate {mib(DECLARED)} (reserved {mib(reserved)})"],
            "warnings": [],
        }
        code, out, err = homelab("reconcile", "--dry-run")
        assert code == 0, out + err
        assert "No changes. The cluster matches the spec." in out
        assert re.search(
            r"^  tiny: measured [\d.]+ MiB RAM on box, estimate 6\.0 MiB \(reserved [\d.]+ MiB\)$", out, re.M
        )

        # A node whose RAM holds the estimate but not the measured figure: the running replica no longer fits.
        write_spec(ram=(DECLARED + with_measured_margin(kept())) // 2)
        code, out, err = homelab("reconcile", "--dry-run")
        assert code == 2, out + err
        assert re.search(
            r"^warning: tiny: measured [\d.]+ MiB RAM on box, estimate 6\.0 MiB \(reserved [\d.]+ MiB\): "
            r"it fits nowhere now and is not placed$",
            err,
            re.M,
        ), err
        assert "- container homelab-tiny" in out, out

        # A changed config (the context) drops the measurement: the plan is back to the declared estimate.
        write_spec(context=1024)
        code, out, err = homelab("reconcile", "--dry-run", "--json")
        assert code == 2, out + err
        plan = json.loads(out)
        assert "calibration" not in plan
        [a] = plan["placement"]["assignments"]
        assert a["ram_bytes"] == DECLARED
        code, out, err = homelab("place", "--json")
        assert code == 0, out + err
        assert "measured" not in json.loads(out)
    finally:
        for c in docker_client.containers.list(all=True):
            c.remove(force=True)
        for v in docker_client.volumes.list():
            v.remove(force=True)
