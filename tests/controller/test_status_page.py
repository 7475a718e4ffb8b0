"""The status page: the pure renderer (bars, states, escaping) and the read-only HTTP server."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from controller.core.status_page import model_colour, render_main, render_page
from controller.effects.status_api import read_events
from controller.effects.status_http import CSP, CachedStatus, StatusServer

GIB = 2**30
MIB = 2**20


def sample(**over: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "cluster": "lab",
        "generated": 1_700_000_000.0,
        "spec": {"path": "/tmp/cluster.yaml", "hash": "abc123"},
        "nodes": {
            "remote": {
                "tier": "remote",
                "state": "DEGRADED",
                "reasons": ["remote/llamacpp/coder: connection refused"],
                "reachable": True,
                "ram_bytes": 8 * GIB,
                "containers": [
                    {"name": "homelab-coder", "model": "coder", "status": "exited", "gpus": [0], "port": 3000},
                ],
                "gpus": [
                    {
                        "index": 0,
                        "name": "RTX <3090>",
                        "vram_bytes": 24 * GIB,
                        "reserve_bytes": 1 * GIB,
                        "foreign_bytes": 2 * GIB,
                        "shortfall_bytes": 0,
                        "capacity_bytes": 21 * GIB,
                        "planned_bytes": 12 * GIB,
                        "used_bytes": 14 * GIB,
                        "models": [
                            {"model": "coder", "gpu_layers": 29, "layers": 29, "planned_bytes": 8 * GIB,
                             "actual_bytes": 9 * GIB, "over_plan": True},
                            {"model": "chat<b>", "gpu_layers": 10, "layers": 33, "planned_bytes": 4 * GIB,
                             "actual_bytes": None, "over_plan": False},
                        ],
                        "pools": [
                            {"pool": "remote-gpu0", "runtime": "llamacpp", "container": "homelab-pool-remote-gpu0",
                             "max_loaded": 1, "loaded": 1, "planned_bytes": 4 * GIB, "ram_bytes": 0,
                             "actual_bytes": None, "over_plan": False, "error": None,
                             "members": [{"model": "od<i>", "state": "loaded", "since": 1_699_999_000.0},
                                         {"model": "od-b", "state": "<weird>", "since": None}]},
                        ],
                    }
                ],
                "cpu_models": [],
            },
            "nas": {
                "tier": "cpu",
                "state": "HEALTHY",
                "reasons": [],
                "gpus": [],
                "cpu_models": [{"model": "generalist", "runtime": "ollama", "ram_bytes": 400 * MIB}],
                "cpu_pools": [
                    {"pool": "nas-cpu", "runtime": "llamacpp", "container": None, "max_loaded": 2, "loaded": 0,
                     "planned_bytes": 0, "ram_bytes": 6 * GIB, "error": "router <down>",
                     "members": [{"model": "cpu-od", "state": "unknown", "since": None}]},
                ],
                "power": {"state": "asleep", "since": 1_699_999_500.0, "reason": "idle <u>", "sleep_after": 600.0,
                          "idle_s": None, "last_use": None, "checked": None},
            },
        },
        "health": {
            "verdict": "DEGRADED",
            "reason": "remote DEGRADED",
            "tiers": {"remote": {"verdict": "DEGRADED", "endpoints": []}, "cpu": {"verdict": "HEALTHY"}},
        },
        "routing": [
            {
                "category": "code",
                "chain": [{"category": "code", "models": [
                    {"model": "coder", "state": "down", "why": "connection refused"},
                    {"model": "generalist", "state": "up", "why": "answers"},
                ]}],
                "answer": {"model": "generalist", "node": "nas", "fallback_used": True},
                "reason": "coder is down",
            }
        ],
        "watch": {
            "last_run": {"time": 1_700_000_000.0, "trigger": "interval", "ok": False, "error": "boom <script>",
                         "plan": {"summary": "1 to add", "steps": 3, "text": "+ container x"}, "duration_s": 1.5},
            "applied": {"spec_hash": "abc123", "time": 1_699_999_000.0},
            "spec_errors": ["cluster.yaml:3:1: models[0].name: <bad>"],
        },
        "events": [{"time": 1_700_000_000.0, "event": "step-failed", "node": "remote", "error": "<img src=x>"}],
    }  # fmt: skip
    status.update(over)
    return status


def test_every_node_gpu_and_model_is_drawn() -> None:
    html = render_page(sample())
    assert 'data-node="remote"' in html and 'data-node="nas"' in html
    assert 'data-state="DEGRADED"' in html
    assert html.count('class="bar planned"') == 1 and html.count('class="bar actual"') == 1
    # reserve 1 of 24 GiB, other processes 2, coder 8, chat 4, the swap pool 4, free 5: widths in % of the card
    widths = [float(w) for w in re.findall(r'class="seg [a-z ]+" style="width:([0-9.]+)%', html.split("bar actual")[0])]
    assert widths == pytest.approx([100 / 24, 200 / 24, 800 / 24, 400 / 24, 400 / 24, 500 / 24], abs=1e-3)
    assert "swap pool remote-gpu0</span> (llamacpp) planned 4.0 GiB VRAM: 1 of 2 loaded (max 1)" in html
    assert "swap pool nas-cpu</span> (llamacpp) CPU only, RAM 6.0 GiB: members unknown" in html
    assert '<p class="power" data-power="asleep">power <span class="badge muted">asleep</span>' in html
    assert "29/29 GPU layers" in html and "10/33 GPU layers" in html
    assert "measured 9.0 GiB" in html and "OVER PLAN" in html
    assert model_colour("coder") in html and model_colour("coder") == model_colour("coder")
    assert "generalist</span> (ollama) CPU only, RAM 400 MiB" in html
    assert "answers now" in html and "(fallback)" in html
    assert "1 to add (3 steps)" in html and "interval" in html
    summary = {"add": 0, "change": 1, "destroy": 0}
    dry = sample(watch={"last_run": {"ok": True, "plan": {"summary": summary, "steps": 2}}, "dry_run": True})
    assert "0 to add, 1 to change, 0 to destroy (2 steps)" in render_main(dry)
    assert "nothing applied yet" in render_main(dry) and "dry run" in render_main(dry)


def test_untrusted_text_is_escaped() -> None:
    html = render_page(sample())
    main = render_main(sample())
    for raw in ("<b>", "<script>", "<img src=x>", "<bad>", "<3090>", "<i>", "<weird>", "<down>", "<u>"):
        assert raw not in main, raw
    assert "chat&lt;b&gt;" in html and "boom &lt;script&gt;" in html and "&lt;img src=x&gt;" in html
    assert html.count("<script>") == 1  # only the page's own


def test_works_with_missing_parts() -> None:
    html = render_page({"cluster": "x", "generated": 0})
    assert "health not probed" in html and "no events" in html
    assert "no <code>homelab watch</code>" in html
    assert render_main({}) in render_page({})
    bare = {"nodes": {"x": {"gpus": [{"pools": [{}, {"members": [{}]}]}], "cpu_pools": [{}], "power": {}}}}
    assert 'data-power="awake"' in render_main(bare)  # a pool or power with nothing in it still renders


def test_read_events_tail(tmp_path: Any) -> None:
    lines = [json.dumps({"time": i, "event": f"e{i}"}) for i in range(100)]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n{torn")
    events = read_events(tmp_path, keep=5)
    assert [e["event"] for e in events] == ["e96", "e97", "e98", "e99"]
    assert read_events(tmp_path / "nowhere") == []


def test_cached_status_builds_once_per_max_age() -> None:
    now = [0.0]
    calls: list[int] = []

    def build() -> dict[str, Any]:
        calls.append(1)
        return {"n": len(calls)}

    cached = CachedStatus(build, max_age=2.0, clock=lambda: now[0])
    assert cached()["n"] == 1 and cached()["n"] == 1
    now[0] = 2.5
    assert cached()["n"] == 2


@pytest.fixture
def server() -> Any:
    registry = CollectorRegistry()
    Counter("homelab_test", "a test counter", registry=registry).inc()
    state: dict[str, Any] = {"fail": False}

    def status() -> dict[str, Any]:
        if state["fail"]:
            raise RuntimeError("cannot observe\nsecond line")
        return sample()

    s = StatusServer(status, registry, max_age=0.0)
    port = s.serve(0)
    yield f"http://127.0.0.1:{port}", state, s
    s.close()


def test_server_routes_and_is_read_only(server: Any) -> None:
    base, state, _ = server
    page = httpx.get(base + "/", trust_env=False)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP and 'data-node="remote"' in page.text
    api = httpx.get(base + "/api/status", trust_env=False).json()
    assert api["nodes"]["remote"]["state"] == "DEGRADED" and "html" not in api
    with_html = httpx.get(base + "/api/status?view=html", trust_env=False).json()
    assert with_html["html"] == render_main(sample())
    metrics = httpx.get(base + "/metrics", trust_env=False)
    assert "homelab_test_total 1.0" in metrics.text
    assert httpx.get(base + "/nothing", trust_env=False).status_code == 404
    for method in ("POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "FROB"):
        r = httpx.request(method, base + "/api/status", trust_env=False)
        assert r.status_code == 405, method
        assert r.headers["allow"] == "GET"
    state["fail"] = True
    broken = httpx.get(base + "/api/status", trust_env=False)
    assert broken.status_code == 500 and broken.json() == {"error": "status unavailable: RuntimeError: cannot observe"}
    state["fail"] = False
    assert httpx.get(base + "/", trust_env=False).status_code == 200  # still serving


def test_server_binds_loopback_by_default(server: Any) -> None:
    _, _, s = server
    assert s._server is not None and s._server.server_address[0] == "127.0.0.1"


def test_csp_allows_exactly_the_page_script() -> None:
    import base64
    import hashlib

    html = render_page(sample())
    script = html.split("<script>")[1].split("</script>")[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in CSP
    assert "http" not in html.split("<script>")[0].split("<style>")[1]  # nothing external in the CSS


def test_an_asleep_node_is_quiet_not_red() -> None:
    """A node put to sleep on purpose: its reasons, its containers that do not answer and its Ollama are drawn in
    the quiet grey of ASLEEP, never with the red of an error (the `.reasons` red used to win over `.muted`)."""
    status = sample()
    status["nodes"]["remote"].update(
        state="ASLEEP",
        reasons=["remote: asleep since 10:00 (idle 31 min)", "remote/llamacpp/coder: connection refused"],
        containers=[{"name": "homelab-coder", "model": "coder", "status": "exited", "gpus": [0], "port": 3000}],
        ollama={"url": "http://127.0.0.1:11434", "reachable": False, "error": "connection refused"},
        power={"state": "asleep", "since": 1_699_999_500.0, "reason": "idle", "sleep_after": 600.0},
        gpus=[],  # nothing measured while it sleeps
    )
    html = render_page(status)
    card = html.split('<section class="node" id="node-remote"')[1].split("</section>")[0]
    assert 'class="bad"' not in card and "badge bad" not in card
    assert '<ul class="reasons asleep"><li>remote: asleep since 10:00' in card
    assert '<td class="muted">exited</td>' in card and '<p class="muted">Ollama' in card
    # The quiet rule is more specific than the red one, so it wins whatever the order of the rules.
    assert ".reasons.asleep{color:#667" in html
    # An awake node that does not answer stays red.
    status["nodes"]["remote"]["state"] = "DEGRADED"
    awake = render_page(status).split('<section class="node" id="node-remote"')[1].split("</section>")[0]
    assert '<td class="bad">exited</td>' in awake and "<ul class=reasons>" in awake
