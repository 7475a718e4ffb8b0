"""The whole mission on the three-node lab of examples/lab, as a user would run it (issue 10).

Everything is real except Ollama (the stand-in of tests/support/ollama_standin.py, since
no Ollama can be installed here) and the GPUs (declared in the spec; the containers run on
the CPU): three Docker engines on their own sockets, three sshd servers, llama.cpp
containers, the LiteLLM proxy, git. Every command is the `homelab` CLI in a subprocess.
The steps run in order in one test (each needs the cluster the previous one left); their
timings are printed at the end of the run by tests/e2e/conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from tests.e2e.conftest import Timings
from tests.support import dockerd as dockerd_support
from tests.support import sshd as sshd_support
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "examples" / "lab" / "lab.py"
LITELLM_ENV = "HOMELAB_LITELLM"

CODE = "My Python script fails with KeyError: 'id' in this dict lookup, how do I fix the traceback?"
PROOF = "Prove that the square root of 2 is irrational, step by step."
GREETING = "hi there"
IMAGE_QUESTION = {
    "model": "auto",
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        }
    ],
}
EMBEDDING = {"model": "auto", "input": ["homelab clusters run models at home"]}


def _require() -> None:
    reasons = [r for r in (dockerd_support.available(), sshd_support.available()) if r is not None]
    exe = os.environ.get(LITELLM_ENV, "")
    if not exe or not os.access(exe, os.X_OK):
        reasons.append(f"${LITELLM_ENV} must name the `litellm` of a venv with 'litellm[proxy]==1.108.7' prisma")
    if shutil.which("git") is None:
        reasons.append("git is not installed")
    if reasons:
        if os.environ.get("HOMELAB_REQUIRE_REAL"):
            pytest.fail("the end-to-end lab needs: " + "; ".join(reasons))
        pytest.skip("; ".join(reasons))


class Mission:
    def __init__(self, d: Path) -> None:
        self.d = d
        self.spec = d / "cluster.yaml"
        self.state = d / "state"
        self.env = {k: v for k, v in os.environ.items() if k not in ("HOMELAB_SPEC", "HOMELAB_STATE_DIR")}
        self.env.update({"NO_COLOR": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"})
        self.info: dict[str, Any] = {}

    def lab(self, *args: str, timeout: float = 360) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(LAB), "--dir", str(self.d), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )

    def hl(self, *args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "controller", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin,
            env=self.env,
            cwd=REPO,
            check=False,
        )

    def hl_json(self, *args: str, stdin: str | None = None, expect: tuple[int, ...] = (0,)) -> Any:
        done = self.hl(*args, "--json", stdin=stdin)
        assert done.returncode in expect, (
            f"homelab {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        )
        return json.loads(done.stdout)

    def watch(self, log: str, *args: str) -> subprocess.Popen[bytes]:
        """`homelab watch ARGS` in the background, its output in DIR/LOG."""
        with (self.d / log).open("wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "controller", "watch", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )

    def docker(self, node: str) -> docker.DockerClient:
        return docker.DockerClient(base_url=f"unix://{self.d / node / 'docker' / 'docker.sock'}", timeout=30)

    def container_ids(self) -> dict[str, str]:
        client = self.docker("remote")
        try:
            return {c.name: c.id for c in client.containers.list(all=True) if c.name.startswith("homelab-")}
        finally:
            client.close()

    def events(self, since: float) -> list[dict[str, Any]]:
        lines = (self.state / "events.jsonl").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["time"] >= since]

    def gateway(self, path: str, body: dict[str, Any]) -> httpx.Response:
        key = (self.d / "secrets" / "litellm-key").read_text().strip()
        url = f"http://127.0.0.2:{self.info['ports']['gateway']}{path}"
        return httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120, trust_env=False)

    def health(self, expect: tuple[int, ...]) -> dict[str, str]:
        report = self.hl_json("health", "-f", str(self.spec), expect=expect)
        return {tier: t["verdict"] for tier, t in report["tiers"].items()}

    def route(self, *args: str, stdin: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.hl_json("route", "-f", str(self.spec), *args, stdin=stdin)
        return result


@pytest.fixture(scope="module")
def mission() -> Iterator[Mission]:
    _require()
    d = Path(tempfile.mkdtemp(prefix="hl-e2e-", dir="/tmp"))
    m = Mission(d)
    try:
        yield m
    finally:
        if d.exists():
            m.lab("down")
        shutil.rmtree(d, ignore_errors=True)


def wait_for(what: str, ok: Callable[[], bool], timeout: float = 60.0) -> float:
    started = time.monotonic()
    while not ok():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:g} s"
        time.sleep(0.2)
    return time.monotonic() - started


def starts_one_at_a_time(events: list[dict[str, Any]], node: str) -> list[str]:
    """The containers started on `node`, in order, checking each was healthy before the next started."""
    order: list[str] = []
    waiting: str | None = None
    for e in events:
        if e.get("node") != node or e.get("step") not in ("run-container", "start-container", "wait-healthy"):
            continue
        if e["event"] == "step-started" and e["step"] in ("run-container", "start-container"):
            assert waiting is None, f"{e['name']} started while {waiting} was not yet healthy"
            waiting = e["name"]
            order.append(e["name"])
        if e["event"] == "step-done" and e["step"] == "wait-healthy":
            assert e["name"] == waiting
            waiting = None
    assert waiting is None
    return order


def test_the_whole_mission(mission: Mission, timings: Timings) -> None:
    m = mission
    spec = str(m.spec)
    remote_containers = {"homelab-coder", "homelab-reasoner", "homelab-chatter", "homelab-embedder"}

    with timings.step("0. lab up (3 engines, 3 sshd, Ollama stand-ins, images)"):
        up = m.lab("up")
        assert up.returncode == 0, up.stdout + up.stderr
        m.info = json.loads((m.d / "lab.json").read_text())

    with timings.step("1. validate and place; placement = estimator"):
        done = m.hl("validate", spec)
        assert done.returncode == 0, done.stdout + done.stderr
        placed = m.hl_json("place", "-f", spec)
        assert placed["status"] in ("OPTIMAL", "FEASIBLE") and placed["unplaced"] == []
        by_model = {a["model"]: a for a in placed["assignments"]}
        assert set(by_model) == {"coder", "reasoner", "chatter", "embedder", "seer", "quick", "generalist"}
        assert by_model["generalist"]["node"] == "nas" and by_model["generalist"]["gpu_layers"] == 0
        for gpu in placed["gpus"]:
            assert gpu["used_bytes"] <= gpu["capacity_bytes"]
        assert sum(1 for a in by_model.values() if a["node"] == "remote") == 4
        files = {"embedder": "synth-embed.gguf"}
        for name in ("coder", "reasoner", "chatter", "embedder"):
            a = by_model[name]
            gguf = m.d / "models" / files.get(name, "gemma-3-270m-q4_k_m.gguf")
            est = m.hl_json(
                "estimate", str(gguf), "--ctx", str(a["context"]), "--ngl", str(a["gpu_layers"]),
                "--gpu-overhead-mib", "64",
            )  # fmt: skip
            assert sum(a["vram_bytes"].values()) == est["total_gpu"], name
            assert a["ram_bytes"] == est["total_cpu"], name

    with timings.step("2. plan (exit 2), apply from nothing, plan again (exit 0)"):
        plan = m.hl("reconcile", "--dry-run", "-f", spec)
        assert plan.returncode == 2, plan.stdout + plan.stderr
        for line in ["+ volume lab-models", "+ file lab-models/gemma-3-270m-q4_k_m.gguf", "+ gateway"] + [
            f"+ container {c}" for c in sorted(remote_containers)
        ]:
            assert line in plan.stdout, line
        since = time.time()
        applied = m.hl("reconcile", "--yes", "-f", spec)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        events = m.events(since)
        kinds = [e.get("step") for e in events if e["event"] == "step-started" and e.get("node") == "remote"]
        assert kinds.index("copy-file") < kinds.index("run-container")  # files in the volume before containers
        assert set(starts_one_at_a_time(events, "remote")) == remote_containers
        again = m.hl("reconcile", "--dry-run", "-f", spec)
        assert again.returncode == 0 and "No changes" in again.stdout, again.stdout + again.stderr

    with timings.step("3. health HEALTHY; route; answers through the gateway"):
        assert m.health(expect=(0,)) == {
            "local": "HEALTHY",
            "remote": "HEALTHY",
            "cpu": "HEALTHY",
            "gateway": "HEALTHY",
        }
        assert m.route(CODE)["model"] == "coder"
        assert m.route(PROOF)["model"] == "reasoner"
        assert m.route(GREETING)["model"] == "quick"
        assert m.route("--request", "-", stdin=json.dumps(IMAGE_QUESTION))["model"] == "seer"
        assert m.route("--request", "-", stdin=json.dumps(EMBEDDING))["model"] == "embedder"
        ports = {c["model"]: c["url"] for c in [m.route("--no-health", p) for p in (CODE, PROOF)]}
        chat = {"max_tokens": 8, "messages": [{"role": "user", "content": CODE}]}
        for model, backend in (("auto", ports["coder"]), ("expert/code", ports["coder"])):
            r = m.gateway("/v1/chat/completions", {**chat, "model": model})
            assert r.status_code == 200, r.text
            assert r.headers["x-litellm-model-api-base"] == backend, model
            assert r.json()["choices"][0]["message"]["content"] is not None
        r = m.gateway(
            "/v1/chat/completions",
            {"model": "expert/reason", "max_tokens": 8, "messages": [{"role": "user", "content": PROOF}]},
        )
        assert r.status_code == 200 and r.headers["x-litellm-model-api-base"] == ports["reasoner"], r.text
        r = m.gateway("/v1/embeddings", {"model": "expert/embed", "input": "hello"})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) > 0, r.text

    with timings.step("4. remote's Docker stops: DOWN, fallback, recovery over SSH"):
        assert m.lab("docker-stop", "remote").returncode == 0
        tiers = m.health(expect=(1,))
        assert tiers["remote"] == "DOWN" and tiers["cpu"] == "HEALTHY", tiers
        fallback = m.route(CODE)
        assert fallback["model"] == "generalist" and fallback["fallback_used"], fallback
        r = m.gateway("/v1/chat/completions", {**chat, "model": "expert/code"})
        assert r.status_code == 200 and r.headers["x-litellm-model-api-base"] == "http://127.0.0.4:" + str(
            m.info["ports"]["ollama"]["nas"]
        ), r.text
        since = time.time()
        recovered = m.hl("recover", "-f", spec, "remote")
        assert recovered.returncode == 0 and "recovered" in recovered.stdout, recovered.stdout + recovered.stderr
        events = m.events(since)
        actions = [e["step"] for e in events if e["event"] == "recovery-step" and e["step"] != "probe"]
        assert actions[:2] == ["restart-docker", "wait-docker"], actions
        assert set(starts_one_at_a_time(events, "remote")) == remote_containers
        assert m.health(expect=(0,))["remote"] == "HEALTHY"

    with timings.step("5. remote asleep (sshd and Docker stopped): woken by its wake command"):
        assert m.lab("sleep", "remote").returncode == 0
        assert m.health(expect=(1,))["remote"] == "DOWN"
        since = time.time()
        recovered = m.hl("recover", "-f", spec, "remote")
        assert recovered.returncode == 0 and "recovered" in recovered.stdout, recovered.stdout + recovered.stderr
        actions = [e["step"] for e in m.events(since) if e["event"] == "recovery-step" and e["step"] != "probe"]
        assert actions[:2] == ["wake", "wait-ssh"], actions
        assert set(starts_one_at_a_time(m.events(since), "remote")) == remote_containers
        assert m.health(expect=(0,))["remote"] == "HEALTHY"

    with timings.step("6a. watch: an edit replaces only the edited model's container"):
        metrics_port = free_port()
        before = m.container_ids()
        watch = m.watch(
            "watch.log",
            "-f",
            spec,
            "--interval",
            "3s",
            "--state-dir",
            str(m.state),
            "--metrics-port",
            str(metrics_port),
        )
        try:
            wait_for("the watch's first run and sweep", lambda: bool(_status(m).get("health")))
            text = m.spec.read_text()
            edited = text.replace("context: 4096", "context: 3072", 1)
            assert edited != text
            m.spec.write_text(edited)
            wait_for(
                "the reasoner replaced",
                lambda: before.get("homelab-reasoner") != m.container_ids().get("homelab-reasoner"),
            )
            wait_for("the watch's apply", lambda: _status(m).get("last_run", {}).get("ok") is True, 120)
            after = m.container_ids()
            assert {n for n in after if after[n] != before.get(n)} == {"homelab-reasoner"}
            scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5, trust_env=False).text
            assert 'homelab_reconcile_total{trigger="spec-changed"}' in scraped
            assert 'homelab_tier_state{state="HEALTHY",tier="remote"} 1.0' in scraped, scraped
        finally:
            watch.send_signal(signal.SIGTERM)
            assert watch.wait(timeout=120) == 0, (m.d / "watch.log").read_text()

    with timings.step("6b. watch --git: a pushed commit is applied"):
        bare, work = m.d / "git" / "cluster.git", m.d / "git" / "work"
        git = ["git", "-c", "user.name=lab", "-c", "user.email=lab@example.invalid", "-c", "init.defaultBranch=main"]
        subprocess.run([*git, "init", "--quiet", "--bare", str(bare)], check=True)
        subprocess.run([*git, "clone", "--quiet", str(bare), str(work)], check=True, capture_output=True)
        shutil.copy(m.spec, work / "cluster.yaml")
        subprocess.run([*git, "-C", str(work), "add", "cluster.yaml"], check=True)
        subprocess.run([*git, "-C", str(work), "commit", "--quiet", "-m", "the lab"], check=True)
        subprocess.run([*git, "-C", str(work), "push", "--quiet", "origin", "HEAD:main"], check=True)
        before = m.container_ids()
        watch = m.watch(
            "watch-git.log", "--git", str(bare), "--branch", "main", "--path", "cluster.yaml", "--interval", "2s",
            "--state-dir", str(m.state),
            "--allow-spec-commands",  # the lab's spec wakes `remote` with a command (lab.py wake): allowed here
        )  # fmt: skip
        try:
            first = _head(work)
            wait_for("the first commit applied", lambda: (_status(m).get("applied") or {}).get("commit") == first, 120)
            text = (work / "cluster.yaml").read_text()
            (work / "cluster.yaml").write_text(text.replace("context: 2048", "context: 1536", 1))  # the coder
            subprocess.run([*git, "-C", str(work), "commit", "--quiet", "-am", "coder: context 1536"], check=True)
            subprocess.run([*git, "-C", str(work), "push", "--quiet", "origin", "HEAD:main"], check=True)
            second = _head(work)
            wait_for(
                "the second commit applied", lambda: (_status(m).get("applied") or {}).get("commit") == second, 120
            )
            after = m.container_ids()
            assert {n for n in after if after[n] != before.get(n)} == {"homelab-coder"}
        finally:
            watch.send_signal(signal.SIGTERM)
            assert watch.wait(timeout=120) == 0, (m.d / "watch-git.log").read_text()

    with timings.step("7. lab down: nothing running, nothing mounted"):
        down = m.lab("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert not m.d.exists()
        needle = str(m.d).encode()
        left = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and needle in _cmdline(p)]
        assert left == []
        assert str(m.d) not in Path("/proc/self/mountinfo").read_text()


def _status(m: Mission) -> dict[str, Any]:
    try:
        return dict(json.loads((m.state / "watch.json").read_text()))
    except (OSError, ValueError):
        return {}


def _head(work: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(work), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""
