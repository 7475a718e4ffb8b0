"""The status page, Prometheus and the Grafana dashboard on the three-node lab of examples/lab (issue 21).

All real: the lab (three Docker engines, sshd, llama.cpp containers, the LiteLLM proxy, the Ollama
stand-in), `homelab watch` serving `/`, `/api/status` and `/metrics`, headless Chromium
(tests/support/chromium.py) and Prometheus (tests/support/prometheus.py) scraping the watch.
Screenshots go to $HOMELAB_ARTEFACTS, else to the test's tmp directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from tests.e2e.test_mission import LAB, LITELLM_ENV, REPO
from tests.support import chromium as chromium_support
from tests.support import dockerd as dockerd_support
from tests.support import prometheus as prometheus_support
from tests.support import sshd as sshd_support
from tests.support.chromium import Browser
from tests.support.ports import free_port
from tests.support.prometheus import Prometheus

DASHBOARD = REPO / "examples" / "grafana-homelab.json"
ARTEFACTS_ENV = "HOMELAB_ARTEFACTS"


def _require() -> None:
    reasons = [
        r
        for r in (
            dockerd_support.available(),
            sshd_support.available(),
            chromium_support.available(),
            prometheus_support.available(),
        )
        if r is not None
    ]
    exe = os.environ.get(LITELLM_ENV, "")
    if not exe or not os.access(exe, os.X_OK):
        reasons.append(f"${LITELLM_ENV} must name the `litellm` of a venv with 'litellm[proxy]==1.108.7' prisma")
    if reasons:
        if os.environ.get("HOMELAB_REQUIRE_REAL"):
            pytest.fail("the status page test needs: " + "; ".join(reasons))
        pytest.skip("; ".join(reasons))


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


class Lab:
    def __init__(self, d: Path) -> None:
        self.d = d
        self.spec = d / "cluster.yaml"
        self.env = {k: v for k, v in os.environ.items() if k not in ("HOMELAB_SPEC", "HOMELAB_STATE_DIR")}
        self.env.update({"NO_COLOR": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"})

    def run(self, *args: str, timeout: float = 360) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*args], capture_output=True, text=True, timeout=timeout, env=self.env, cwd=REPO, check=False
        )


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    _require()
    d = Path(tempfile.mkdtemp(prefix="hl-ui-", dir="/tmp"))
    lab = Lab(d)
    try:
        up = lab.run(sys.executable, str(LAB), "--dir", str(d), "up")
        assert up.returncode == 0, up.stdout + up.stderr
        done = lab.run(sys.executable, "-m", "controller", "reconcile", "-f", str(lab.spec), "--yes")
        assert done.returncode == 0, done.stdout + done.stderr
        yield lab
    finally:
        lab.run(sys.executable, str(LAB), "--dir", str(d), "down")
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def artefacts(tmp_path: Path) -> Path:
    where = os.environ.get(ARTEFACTS_ENV)
    d = Path(where) if where else tmp_path / "artefacts"
    d.mkdir(parents=True, exist_ok=True)
    return d


def wait_until(what: str, ok: Any, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.5)


def test_status_page_prometheus_and_dashboard(lab: Lab, artefacts: Path) -> None:
    spec_models = {"coder", "reasoner", "chatter", "embedder", "seer", "quick", "generalist"}
    port = free_port("127.0.0.1")
    log = (lab.d / "watch.log").open("wb")
    # --dry-run: the watch reports and sweeps every 2 s but does not restart the container this test kills
    watch = subprocess.Popen(
        [sys.executable, "-m", "controller", "watch", "-f", str(lab.spec), "--dry-run", "--interval", "2s",
         "--metrics-port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=lab.env, cwd=REPO,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    browser: Browser | None = None
    prom: Prometheus | None = None
    try:

        def serving() -> bool:
            try:
                return httpx.get(base + "/metrics", timeout=2, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until("watch serving /metrics", serving, 120)
        wait_until("the watch's first sweep", lambda: "homelab_tier_state{" in httpx.get(base + "/metrics").text)
        assert httpx.post(base + "/api/status", trust_env=False).status_code == 405

        # ---- Prometheus scrapes the watch; every dashboard query answers with data
        prom = Prometheus([f"127.0.0.1:{port}"])
        wait_until("Prometheus scraped the watch", prom.targets_up, 60)
        time.sleep(6)  # several scrapes, so rate() and increase() have two samples
        api = httpx.get(base + "/api/status", timeout=60, trust_env=False).json()
        no_nvidia_smi = any("nvidia-smi not found" in w for w in api["warnings"])
        empty = []
        for expr in dashboard_queries():
            result = prom.query(expr)
            if not result:
                empty.append(expr)
        # nvidia-smi's figure exists only where nvidia-smi runs: the lab's declared GPUs have none
        expected_empty = [q for q in dashboard_queries() if "homelab_gpu_used_bytes" in q] if no_nvidia_smi else []
        assert empty == expected_empty, f"dashboard queries without data: {empty}"

        # ---- the page: every node, GPU bar and model
        browser = Browser()
        browser.goto(base + "/")
        nodes = browser.eval("[...document.querySelectorAll('section.node')].map(n => n.dataset.node)")
        assert sorted(nodes) == ["local", "nas", "remote"]
        bars = browser.eval("[...document.querySelectorAll('.gpu')].map(g => g.dataset.node + '/' + g.dataset.gpu)")
        assert sorted(bars) == ["local/0", "remote/0", "remote/1"]
        shown = set(browser.eval("[...document.querySelectorAll('.model-name')].map(m => m.textContent)"))
        assert shown == spec_models
        states = browser.eval("Object.fromEntries([...document.querySelectorAll('section.node')]"
                              ".map(n => [n.dataset.node, n.dataset.state]))")  # fmt: skip
        assert states == {"local": "HEALTHY", "remote": "HEALTHY", "nas": "HEALTHY"}
        code = browser.eval("document.querySelector('tr[data-category=code] td:nth-child(3)').textContent")
        assert code.startswith("coder on remote")
        browser.screenshot(artefacts / "status-page-healthy.png")

        # ---- a model killed: its node turns DEGRADED on the open page at its next refresh (no reload)
        client = docker.DockerClient(base_url=f"unix://{lab.d / 'remote' / 'docker' / 'docker.sock'}", timeout=30)
        try:
            client.containers.get("homelab-coder").kill()
        finally:
            client.close()
        browser.wait_for(
            "document.querySelector('section.node[data-node=remote]').dataset.state === 'DEGRADED'", timeout=60
        )
        reasons = browser.eval("document.querySelector('section.node[data-node=remote] .reasons').textContent")
        assert "coder" in reasons
        assert browser.eval("document.getElementById('stamp').textContent").startswith("refreshed")
        code = browser.eval("document.querySelector('tr[data-category=code] td:nth-child(3)').textContent")
        assert code.startswith("generalist on nas")
        browser.screenshot(artefacts / "status-page-degraded.png")
        # without JavaScript: the server's own render says the same
        html = httpx.get(base + "/", timeout=60, trust_env=False).text
        assert 'data-node="remote" data-state="DEGRADED"' in html
        for shot in ("status-page-healthy.png", "status-page-degraded.png"):
            assert (artefacts / shot).read_bytes().startswith(b"\x89PNG")
    finally:
        if browser is not None:
            browser.close()
        if prom is not None:
            prom.close()
        watch.terminate()
        try:
            watch.wait(timeout=60)
        except subprocess.TimeoutExpired:
            watch.kill()
            watch.wait()
        log.close()
