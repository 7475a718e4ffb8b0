"""Calibration against a real dockerd and a real llama-server container on the CPU (issue 19, part 3).

After the apply, Docker's stats give the container's real host memory, kept in the state directory;
`homelab status` shows it beside the estimate, and the next plan (which reserves max(estimate, measured + margin))
still plans nothing. On this synthetic GGUF the measured figure is below the estimate (about 17 vs 24 MiB here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import docker
import pytest

from controller.drivers.docker import stats_memory
from controller.effects import calibration
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
    args: ["{extra}"]
"""

MIB = 1 << 20
EXTRA = "--no-mmap"
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
