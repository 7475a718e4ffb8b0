"""Nodes that sleep when idle and wake when asked (issue 18), on a lab of its own.

Real: three Docker engines, three sshd servers, the llama.cpp containers on `remote`, the LiteLLM proxy with
homelab's wake-on-request plugin, `homelab watch`. The lab's `remote` gets a `power` section whose sleep
command (run over SSH, as on a real node) asks the lab to stop its sshd and Docker engine (`lab.py sleep`,
detached: a suspending machine drops the session too), and whose wake command counts itself, then starts
them again (`lab.py wake`). Each step's time is printed at the end of the run (tests/e2e/conftest.py); the
wake-to-answer times are printed as they are measured.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Timings
from tests.e2e.test_mission import CODE, LAB, Mission, _require, _status, starts_one_at_a_time, wait_for
from tests.support.ports import free_port

SLEEP_AFTER_S = 4
REMOTE_MODELS = {"homelab-coder", "homelab-reasoner", "homelab-chatter", "homelab-embedder"}


@pytest.fixture(scope="module")
def lab() -> Iterator[Mission]:
    _require()
    d = Path(tempfile.mkdtemp(prefix="hl-e2e-power-", dir="/tmp"))
    m = Mission(d)
    try:
        yield m
    finally:
        if d.exists():
            m.lab("down")
        shutil.rmtree(d, ignore_errors=True)


def with_power(m: Mission, on_request: str) -> None:
    """The lab's spec with `power` on `remote` (the others stay as they are)."""
    text = m.spec.read_text()
    if "sleep_command:" in text:
        text = text.replace("on_request: wait", f"on_request: {on_request}").replace(
            "on_request: fallback", f"on_request: {on_request}"
        )
    else:
        wake_old = next(line + "\n" for line in text.splitlines() if line.strip().endswith(" wake remote"))
        indent = " " * (len(wake_old) - len(wake_old.lstrip()))  # of the wake command; `power` is a level up
        python = wake_old.split("command: ", 1)[1].split()[0]  # the lab's own interpreter
        wake = f"echo wake >> {m.d}/wakes; {python} {LAB} --dir {m.d} wake remote"
        wake_new = f"{indent}command: {json.dumps(wake)}\n"
        sleep = f"setsid nohup {python} {LAB} --dir {m.d} sleep remote >/dev/null 2>&1 < /dev/null &"
        up = indent[:-2]
        power = (
            f"{up}power:\n{indent}sleep_after: {SLEEP_AFTER_S}s\n{indent}sleep_command: {json.dumps(sleep)}\n"
            f"{indent}wake_timeout: 90s\n{indent}on_request: {on_request}\n"
        )
        text = text.replace(wake_old, wake_new + power)
    m.spec.write_text(text)


def wakes(m: Mission) -> int:
    try:
        return len((m.d / "wakes").read_text().splitlines())
    except FileNotFoundError:
        return 0


def power_of(m: Mission, node: str = "remote") -> dict[str, Any]:
    return dict((_status(m).get("power") or {}).get(node) or {})


def measured(timings: Timings, what: str, seconds: float) -> None:
    """A figure for the report, printed with the step timings at the end of the run."""
    timings.steps.append((what, seconds, "ok"))


def ask(m: Mission, model: str = "expert/code") -> tuple[httpx.Response, float]:
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": CODE}]}
    started = time.monotonic()
    r = m.gateway("/v1/chat/completions", body)
    return r, time.monotonic() - started


def test_idle_node_sleeps_and_requests_wake_it(lab: Mission, timings: Timings) -> None:
    m = lab
    spec = str(m.spec)
    with timings.step("power 0. lab up; remote gets `power` (wait); apply from nothing"):
        up = m.lab("up")
        assert up.returncode == 0, up.stdout + up.stderr
        m.info = json.loads((m.d / "lab.json").read_text())
        with_power(m, "wait")
        done = m.hl("validate", spec)
        assert done.returncode == 0, done.stdout + done.stderr
        applied = m.hl("reconcile", "--yes", "-f", spec)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        config = (m.d / "litellm" / "config.yaml").read_text()
        assert "homelab_power.handler" in config and (m.d / "litellm" / "homelab_power.py").exists()
        coder_url = m.route("--no-health", CODE)["url"]

    metrics_port = free_port()
    watch = m.watch(
        "watch-power.log", "-f", spec, "--interval", "1s", "--state-dir", str(m.state),
        "--metrics-port", str(metrics_port),
    )  # fmt: skip
    try:
        with timings.step(f"power 1. idle remote put to sleep (sleep_after {SLEEP_AFTER_S}s); ASLEEP, exit 0"):
            since = time.time()
            asleep_in = wait_for("remote asleep", lambda: power_of(m).get("state") == "asleep", 120)
            wait_for("remote's sshd and Docker stopped", lambda: m.health(expect=(0, 1, 2))["remote"] == "ASLEEP")
            tiers = m.health(expect=(0,))  # ASLEEP is exit 0
            assert tiers == {"local": "HEALTHY", "remote": "ASLEEP", "cpu": "HEALTHY", "gateway": "HEALTHY"}
            status = m.hl("status", "-f", spec)
            assert "remote: ASLEEP since" in status.stdout, status.stdout + status.stderr
            assert _status(m)["asleep"] == ["remote"]
            scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5, trust_env=False).text
            assert 'homelab_node_power_state{node="remote",state="asleep"} 1.0' in scraped
            assert 'homelab_tier_state{state="ASLEEP",tier="remote"} 1.0' in scraped
            route = m.route(CODE)
            assert route["model"] == "coder" and "asleep: waking" in json.dumps(route["power"]), route
            time.sleep(3)  # three more sweeps: still no recovery
            events = m.events(since)
            assert [e["event"] for e in events if e.get("node") == "remote" and e["event"].startswith("node-")] == [
                "node-sleep",
                "node-asleep",
            ]
            assert not [e for e in events if e["event"].startswith("recovery")], "recovery touched a sleeping node"
            said = (m.d / "watch-power.log").read_text()
            assert "node remote: sleep: run `" in said and "node remote: asleep (idle" in said, said
            assert wakes(m) == 0
            measured(
                timings, f"measured: remote asleep after the watch started (sleep_after {SLEEP_AFTER_S} s)", asleep_in
            )

        with timings.step("power 2. ten concurrent requests (wait): one wake, all answered by the coder"):
            since = time.time()
            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                answers = list(pool.map(lambda _: ask(m), range(10)))
            for r, _ in answers:
                assert r.status_code == 200, r.text
                assert r.headers["x-litellm-model-api-base"] == coder_url, r.headers
            assert wakes(m) == 1, "ten requests during one wake must send one wake"
            times = sorted(t for _, t in answers)
            measured(timings, "measured: wait: wake-to-answer, first of 10 concurrent requests", times[0])
            measured(timings, "measured: wait: wake-to-answer, last of 10 concurrent requests", times[-1])
            wait_for("remote awake in the watch", lambda: power_of(m).get("state") == "awake", 60)
            events = m.events(since)
            assert "node-awake" in [e["event"] for e in events if e.get("node") == "remote"]
            assert set(starts_one_at_a_time(events, "remote")) <= REMOTE_MODELS
            assert m.health(expect=(0,))["remote"] == "HEALTHY"
    finally:
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(timeout=120) == 0, (m.d / "watch-power.log").read_text()

    with timings.step("power 3. on_request: fallback (applied while awake)"):
        with_power(m, "fallback")
        applied = m.hl("reconcile", "--yes", "-f", spec)
        assert applied.returncode == 0, applied.stdout + applied.stderr
    watch = m.watch("watch-power2.log", "-f", spec, "--interval", "1s", "--state-dir", str(m.state))
    try:
        with timings.step("power 4. asleep again; a request is answered at once by the fallback; remote wakes"):
            wait_for("remote asleep again", lambda: power_of(m).get("state") == "asleep", 120)
            wait_for("remote's engines stopped", lambda: m.health(expect=(0, 1, 2))["remote"] == "ASLEEP")
            route = m.route(CODE)
            assert route["model"] == "generalist" and "asleep: using fallback" in json.dumps(route["power"]), route
            before = wakes(m)
            r, took = ask(m)
            assert r.status_code == 200, r.text
            nas = f"http://127.0.0.4:{m.info['ports']['ollama']['nas']}"
            assert r.headers["x-litellm-model-api-base"] == nas, r.headers
            measured(timings, "measured: fallback: answered by the NAS while remote wakes", took)
            awake_in = wait_for("remote awake after the fallback", lambda: power_of(m).get("state") == "awake", 90)
            assert wakes(m) == before + 1
            assert m.health(expect=(0,))["remote"] == "HEALTHY"
            measured(timings, "measured: fallback: remote awake (watch) after the request", took + awake_in)

        with timings.step("power 5. asleep again; `homelab wake remote`"):
            wait_for("remote asleep again", lambda: power_of(m).get("state") == "asleep", 120)
            wait_for("remote's engines stopped", lambda: m.health(expect=(0, 1, 2))["remote"] == "ASLEEP")
            since = time.time()
            woke = m.hl("wake", "-f", spec, "--state-dir", str(m.state), "remote")
            assert woke.returncode == 0, woke.stdout + woke.stderr + (m.d / "watch-power2.log").read_text()[-4000:]
            steps = [e["step"] for e in m.events(since) if e["event"] == "recovery-step"]
            assert steps[:2] == ["wake", "wait-ssh"], steps
            assert set(starts_one_at_a_time(m.events(since), "remote")) <= REMOTE_MODELS
            assert m.health(expect=(0,))["remote"] == "HEALTHY"
    finally:
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(timeout=120) == 0, (m.d / "watch-power2.log").read_text()
