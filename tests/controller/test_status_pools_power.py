"""The status page's swap pools and node power (issues 17 and 18 on the page): `/api/status`'s pool and power
fields as `status_api.build` makes them (the real solver, the shipped fake Docker driver), and how the pure
renderer draws them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from controller.core.status_page import STATE_CLASS, render_main, tiers_section
from controller.drivers.base import DriverError
from controller.effects.engine import STATE_ENV, Wiring
from controller.effects.gpu_use import GpuReality
from controller.effects.health import HealthReport
from controller.effects.pools import pool_now
from controller.effects.power import ASLEEP, PowerStore
from controller.effects.status_api import Found, build, collect
from specs.model import ClusterSpec
from tests.controller.test_pools import POOL, SPEC, Lab, spec_of

GIB = 2**30

POWER_SPEC = SPEC.replace(
    '    llamacpp: {image: "llama:test", ports: 3000-3009, volume: models, threads: 2}\n',
    '    llamacpp: {image: "llama:test", ports: 3000-3009, volume: models, threads: 2}\n'
    "    ssh: {user: root}\n"
    "    wake: {command: wake-box}\n"
    "    power: {sleep_after: 30m}\n",
).replace(
    "gateway:",
    """\
  - name: od-cpu
    runtime: llamacpp
    source: {gguf: /srv/models/cpu.gguf}
    residency: on-demand
    placement: {cpu_only: true}
    memory: {vram: 3GiB, ram: 3GiB, layers: 20}
gateway:""",
)


def found_for(spec: ClusterSpec, tmp_path: Path, **over: Any) -> Found:
    """The cluster after one apply: the pinned chat, the GPU pool's router running; its members' states set."""
    lab = Lab()
    lab.box.source_files["/srv/models/cpu.gguf"] = 2000
    lab.apply(spec, tmp_path)
    prepared = lab.prepare(spec)
    router = next(c for c in prepared.observed.nodes["box"].containers if c.name == POOL)
    states = {"od-a": "unloaded", "bee": "loaded", "od-c": "sleeping"}
    now = pool_now(router, states, {"bee": 30.0, "od-c": 90.0}, 1_700_000_000.0, None)
    fields: dict[str, Any] = {"pools": {("box", POOL): now}, **over}
    return Found(prepared.observed, {}, GpuReality(), prepared.placement, prepared.desired, None, **fields)


def status_of(spec: ClusterSpec, found: Found, watch: dict[str, Any] | None = None) -> dict[str, Any]:
    return build(spec, found, spec_path="c.yaml", spec_hash="h", watch=watch, events=[], now=1_700_000_000.0)


def test_a_gpu_pool_is_one_share_with_its_members_states(tmp_path: Path) -> None:
    spec = spec_of(POWER_SPEC)
    status = status_of(spec, found_for(spec, tmp_path))
    gpu = status["nodes"]["box"]["gpus"][0]
    assert [m["model"] for m in gpu["models"]] == ["chat"]  # no pseudo-model row for the pool
    (pool,) = gpu["pools"]
    assert pool["pool"] == "box-gpu0" and pool["container"] == POOL and pool["max_loaded"] == 1
    assert pool["planned_bytes"] == 8 * GIB  # the largest member: max_loaded 1
    assert pool["loaded"] == 1 and pool["error"] is None
    assert [(m["model"], m["state"], m["since"]) for m in pool["members"]] == [
        ("od-a", "unloaded", None),
        ("od-b", "loaded", 1_700_000_000.0 - 30.0),
        ("od-c", "sleeping", 1_700_000_000.0 - 90.0),
    ]
    html = render_main(status)
    card = html.split('id="node-box"')[1]
    assert "0/0 GPU layers" not in html and "swap pool:" not in html
    assert 'class="seg model pool"' in card and "swap pool (max 1)" in card
    assert "swap pool box-gpu0</span> (llamacpp) planned 8.0 GiB VRAM: 1 of 3 loaded (max 1)" in card
    gpu_part = card.split('<div class="gpu"')[1].split("<ul class=cpu>")[0]
    members = dict(re.findall(r'<li data-model="([^"]+)" data-state="[^"]+">.*?class="badge ([a-z]+)"', gpu_part))
    assert members == {"od-a": "idle", "od-b": "ok", "od-c": "idle"}
    assert "not loaded: loads on request" in card and "asleep after its ttl" in card
    # the bar: the pinned model and the pool, nothing else planned
    used = sum(m["planned_bytes"] for m in gpu["models"]) + pool["planned_bytes"]
    assert used == gpu["planned_bytes"]


def test_a_cpu_pool_is_with_the_cpu_models(tmp_path: Path) -> None:
    spec = spec_of(POWER_SPEC)
    status = status_of(spec, found_for(spec, tmp_path))
    node = status["nodes"]["box"]
    assert [m["model"] for m in node["cpu_models"]] == []  # on demand: in its pool, not on its own
    (pool,) = node["cpu_pools"]
    assert pool["pool"] == "box-cpu" and [m["model"] for m in pool["members"]] == ["od-cpu"]
    assert pool["ram_bytes"] >= 3 * GIB and pool["planned_bytes"] == 0
    # its router is not observed here (only the GPU pool's states were given): unknown, and why
    assert pool["members"][0]["state"] == "unknown" and pool["error"]
    html = render_main(status)
    cpu = html.split("<ul class=cpu>")[1].split("</ul></li></ul>")[0]
    assert "swap pool box-cpu</span> (llamacpp) CPU only, RAM" in cpu and "members unknown" in cpu


def test_a_failed_and_a_loading_member(tmp_path: Path) -> None:
    spec = spec_of(POWER_SPEC)
    found = found_for(spec, tmp_path)
    router = next(c for c in found.observed.nodes["box"].containers if c.name == POOL)
    states = {"od-a": "failed", "bee": "loading", "od-c": "unloaded"}
    found = Found(**{**found.__dict__, "pools": {("box", POOL): pool_now(router, states, {}, 0.0, None)}})
    html = render_main(status_of(spec, found))
    members = dict(re.findall(r'<li data-model="([^"]+)" data-state="([^"]+)">.*?class="badge ([a-z]+)"', html)[i][::2]
                   for i in range(3))  # fmt: skip
    assert members == {"od-a": "bad", "od-b": "warn", "od-c": "idle"}
    assert "0 of 3 loaded (max 1)" in html


def test_power_of_a_sleeping_node(tmp_path: Path) -> None:
    spec = spec_of(POWER_SPEC)
    record = {"box": {"state": "asleep", "since": 1_699_999_000.0, "reason": "idle 31 min <x>"}}
    status = status_of(spec, found_for(spec, tmp_path, power=record))
    power = status["nodes"]["box"]["power"]
    assert power == {
        "state": "asleep",
        "since": 1_699_999_000.0,
        "reason": "idle 31 min <x>",
        "sleep_after": 1800.0,
        "idle_s": None,
        "last_use": None,
        "checked": None,
    }
    html = render_main(status)
    line = html.split('<p class="power" data-power="asleep">')[1].split("</p>")[0]
    assert '<span class="badge muted">asleep</span> since ' in line and "idle 31 min &lt;x&gt;" in line
    assert "sleeps after 30 min idle" in line and "<x>" not in html


def test_power_of_an_awake_node_from_the_watch(tmp_path: Path) -> None:
    spec = spec_of(POWER_SPEC)
    watch: dict[str, Any] = {
        "updated": 1_700_000_000.0,
        "power": {"box": {"state": "awake", "sleep_after": 1800.0, "idle_s": 120.0, "reason": "idle 2 min of 30 min"}},
    }
    power = status_of(spec, found_for(spec, tmp_path), watch)["nodes"]["box"]["power"]
    assert power["state"] == "awake" and power["since"] is None
    assert power["last_use"] == 1_700_000_000.0 - 120.0 and power["idle_s"] == 120.0
    assert power["checked"] == 1_700_000_000.0
    html = render_main(status_of(spec, found_for(spec, tmp_path), watch))
    assert '<p class="power" data-power="awake">power <span class="badge ok">awake</span>' in html
    assert "last used " in html and "(idle 2 min)" in html and "sleeps after 30 min idle" in html
    # waking: the watch resumes it
    watch["power"]["box"] = {"state": "waking", "since": 1_699_999_990.0, "reason": "woken by a request"}
    power = status_of(spec, found_for(spec, tmp_path), watch)["nodes"]["box"]["power"]
    assert (power["state"], power["since"], power["last_use"]) == ("waking", 1_699_999_990.0, None)


def test_a_node_without_power_is_always_on(tmp_path: Path) -> None:
    spec = spec_of()
    status = status_of(spec, found_for(spec, tmp_path))
    assert status["nodes"]["box"]["power"] is None
    assert 'class="power"' not in render_main(status)


def test_idle_is_not_down() -> None:
    assert STATE_CLASS["IDLE"] == "idle" != STATE_CLASS["DOWN"]
    endpoints = [
        {"name": "box/llamapool/od-a", "status": "idle", "error": "not loaded: loads on request"},
        {"name": "box/llamacpp/chat", "status": "down", "error": "connection refused"},
        {"name": "box/llamapool/od-b", "status": "up"},
    ]
    status = {
        "health": {"verdict": "DEGRADED", "tiers": {"remote": {"verdict": "DEGRADED", "endpoints": endpoints}}},
        "nodes": {"box": {"tier": "remote"}},
    }
    html = tiers_section(status)
    reasons = html.split("<ul class=reasons>")[1].split("</ul>")[0]
    assert "box/llamacpp/chat: connection refused" in reasons
    assert '<li class="idle"><span class="badge idle">idle</span> box/llamapool/od-a (on demand' in reasons
    assert "od-a: not loaded" not in reasons


def test_collect_reads_the_power_state_of_the_state_directory_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`homelab ui --state-dir DIR` hands DIR to `collect`: the power state comes from there, not from the
    default state directory ($HOMELAB_STATE_DIR here, which says nothing)."""
    spec = spec_of(POWER_SPEC)
    lab = Lab()
    lab.box.source_files["/srv/models/cpu.gguf"] = 2000
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "default-state"))
    given = tmp_path / "given-state"
    PowerStore.of(spec, given).put("box", ASLEEP, "idle 31 min")

    def no_health(spec: ClusterSpec, desired: object) -> HealthReport:
        raise DriverError("not probed in this test")

    wiring = Wiring(
        connect=lambda spec: lab.connect, gpu_probe=lambda nodes: {}, health=no_health, port_holder=lambda a, p: None
    )
    status = collect(spec, tmp_path / "c.yaml", given, wiring)
    assert status["nodes"]["box"]["power"]["state"] == "asleep"
    assert status["nodes"]["box"]["power"]["reason"] == "idle 31 min"
