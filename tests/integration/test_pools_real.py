"""On-demand models in a swap pool, for real (issue 17): a router-mode llama-server container and LiteLLM.

A private dockerd runs the pool's container (the locally built llama-server image, CPU), homelab writes its
preset, and the real LiteLLM proxy ($HOMELAB_LITELLM, mode `process`) routes each member by its alias. Three
members (three synthetic GGUFs with different weights), `max_loaded: 1`: A, then B, then A again through the
gateway — each answer is that member's own (greedy decoding: a member always gives the same answer, and the
three give different ones), the router has exactly the requested member loaded afterwards, and the child
process that answered carries its alias. `bench/pool_swap.py` measures the same swap with timings.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from controller.drivers.docker import DockerEngine
from controller.drivers.llamacpp import router_models
from controller.effects.engine import CachingConnect
from controller.effects.health import Status, check
from controller.effects.pools import observe_pools
from tests.support import dockerd as dockerd_support
from tests.support.pool_lab import MEMBERS, PoolLab
from tests.support.ports import free_port, free_port_range
from tests.support.synth import shape_by_name, write_synth_gguf
from tests.support.wiring import Wired


@pytest.fixture
def pool(
    dockerd: dockerd_support.Dockerd,
    docker_client: docker.DockerClient,
    busybox_image: str,
    llamacpp_image: str,
    litellm_bin: str,
    cluster: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[PoolLab]:
    models = tmp_path / "models"
    models.mkdir()
    for seed, name in enumerate(MEMBERS, start=1):
        write_synth_gguf(models / f"{name}.gguf", shape_by_name("mha-f16"), seed=seed)
    key = "sk-homelab-" + secrets.token_hex(12)
    monkeypatch.setenv("HOMELAB_TEST_LITELLM_KEY", key)
    base = free_port_range(4)
    fields: dict[str, object] = {
        "cluster": cluster,
        "endpoint": dockerd.url,
        "image": llamacpp_image,
        "helper": busybox_image,
        "base": base,
        "top": base + 3,
        "models": models,
        "gateway_port": free_port(),
        "litellm": litellm_bin,
        "tmp": tmp_path,
        "key": key,
    }
    p = PoolLab(fields, tmp_path)
    try:
        yield p
    finally:
        p.stop_gateway()
        for container in docker_client.containers.list(all=True):
            container.remove(force=True)
        for volume in docker_client.volumes.list():
            volume.remove(force=True)


def loaded(url: str) -> list[str]:
    return sorted(alias for alias, m in router_models(url, 5).items() if m.state == "loaded")


def test_a_then_b_then_a_through_the_gateway(pool: PoolLab, wired: Wired, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = pool.spec()
    first = pool.apply(spec)
    assert [p.key for p in first.placement.pools] == ["box-gpu0"]
    kinds = [(s.kind.value, s.name) for s in first.plan.steps if s.node == "box"]
    assert [k for k in kinds if k[0] in ("run-container", "wait-healthy")] == [
        ("run-container", "homelab-pool-box-gpu0"),
        ("wait-healthy", "homelab-pool-box-gpu0"),
    ]
    again, _ = pool.prepare(spec)
    assert again.plan.in_sync, again.plan.changes  # a second reconcile plans nothing
    router = f"http://127.0.0.1:{pool.fields['base']}"
    assert loaded(router) == []  # nothing is loaded before it is asked for

    # nothing loaded is not a failure: every member is idle, the tier healthy
    report = check(spec, first.desired)
    members = {p.endpoint.model: p.status for p in report.probes if p.endpoint.kind == "llamapool"}
    assert members == dict.fromkeys(MEMBERS, Status.IDLE)
    assert {t.tier: t.verdict.value for t in report.tiers}["remote"] == "HEALTHY"

    answers: list[tuple[str, str, str, float]] = []
    for name in ("od-a", "od-b", "od-a"):
        text, backend, ttft = pool.ask(name)
        answers.append((name, text, backend, ttft))
        assert loaded(router) == [name]  # max_loaded 1: the one asked for, and only it
        assert backend == name  # llama-server names the member that answered
    (a1, b1, a2) = (answers[0][1], answers[1][1], answers[2][1])
    assert a1 == a2 and a1 != b1, answers  # A's own answer both times, B's differs
    c_text, _, _ = pool.ask("od-c")
    assert c_text not in (a1, b1)

    # status: which member is loaded now and since when (its child process's start, from `docker top`)
    observed = pool.prepare(spec)[0].observed
    now = observe_pools(spec, observed, CachingConnect(lambda n: DockerEngine(n, str(pool.fields["cluster"]))))
    (got,) = now.values()
    assert [(m.model, m.state) for m in got.members] == [("od-a", "unloaded"), ("od-b", "unloaded"), ("od-c", "loaded")]
    since = got.members[2].since
    assert since is not None and time.time() - 120 < since <= time.time() + 1
    # the same through `homelab status`
    spec_file = pool.tmp / "cluster.yaml"
    spec_file.write_text(pool.spec_text())
    monkeypatch.setenv("HOMELAB_STATE_DIR", str(pool.tmp / "state"))
    code, stdout, stderr = wired.run("status", "-f", str(spec_file))
    assert code == 0, stderr
    assert "    swap pool: 1 of 3 loaded (max 1)\n" in stdout, stdout
    assert re.search(r"\n      od-c  loaded since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+s ago\)\n", stdout), stdout
    assert "      od-a  unloaded\n" in stdout
    print(stdout)
    for name, _, _, ttft in answers:
        print(f"{name}: first token {ttft:.2f}s")


def test_a_members_context_replaces_only_the_pool(pool: PoolLab) -> None:
    pool.apply(pool.spec())
    pool.contexts["od-b"] = 1024
    changed = pool.spec()
    prepared, _ = pool.prepare(changed)
    replaced = [(c.action.value, c.name) for c in prepared.diff.changes if c.kind == "container"]
    assert replaced == [("replace", "homelab-pool-box-gpu0")]
    pool.apply(changed)
    text, backend, _ = pool.ask("od-b")
    assert backend == "od-b" and text
    del pool.contexts["od-c"]  # a member removed leaves the pool
    smaller = pool.spec()
    pool.apply(smaller)
    router = f"http://127.0.0.1:{pool.fields['base']}"
    assert sorted(router_models(router, 5)) == ["od-a", "od-b"]
    assert pool.prepare(smaller)[0].plan.in_sync
