"""Health: tier verdicts for every mix, probes against small local servers, and the CLI's exit codes."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.effects.health import (
    Endpoint,
    Probe,
    Status,
    TierHealth,
    Verdict,
    classify,
    endpoints,
    probe_all,
    prognosis,
    tier_verdict,
)
from specs import parse_spec
from tests.support.ports import free_port
from tests.support.stubs import Behaviour, StubServers


@pytest.fixture
def stubs() -> Iterator[StubServers]:
    servers = StubServers()
    yield servers
    servers.close()


def ep(
    name: str = "n/ollama", tier: str = "local", kind: str = "ollama", target: str = "", timeout: float = 1.0
) -> Endpoint:
    return Endpoint(name, tier, kind, target, timeout, name.split("/")[0])


def probe(status: Status, tier: str = "local", name: str = "n/ollama", kind: str = "ollama") -> Probe:
    return Probe(ep(name, tier, kind), status, error=None if status is Status.UP else status.value)


# --------------------------------------------------------------------------- verdicts


def expected_verdict(statuses: tuple[Status, ...]) -> Verdict:
    if statuses and all(s is Status.ASLEEP for s in statuses):
        return Verdict.ASLEEP
    statuses = tuple(s for s in statuses if s is not Status.ASLEEP)  # asleep on purpose: neither up nor down
    # an idle on-demand model (not loaded, loads on request) is as healthy as one that answers
    if all(s in (Status.UP, Status.IDLE) for s in statuses):
        return Verdict.HEALTHY
    if all(s is Status.DOWN for s in statuses):
        return Verdict.DOWN
    return Verdict.DEGRADED


@pytest.mark.parametrize("statuses", list(itertools.product(list(Status), repeat=3)))
def test_tier_verdict_for_every_mix(statuses: tuple[Status, ...]) -> None:
    assert tier_verdict(probe(s) for s in statuses) == expected_verdict(statuses)


def test_tier_verdict_cases_spelled_out() -> None:
    assert tier_verdict([probe(Status.UP), probe(Status.UP)]) is Verdict.HEALTHY
    assert tier_verdict([probe(Status.UP), probe(Status.SLOW)]) is Verdict.DEGRADED  # slower than the threshold
    assert tier_verdict([probe(Status.UP), probe(Status.STARTING)]) is Verdict.DEGRADED  # loading is not down
    assert tier_verdict([probe(Status.STARTING)]) is Verdict.DEGRADED
    assert tier_verdict([probe(Status.DOWN), probe(Status.UP)]) is Verdict.DEGRADED
    assert tier_verdict([probe(Status.DOWN), probe(Status.DOWN)]) is Verdict.DOWN


def test_a_tier_whose_model_servers_are_all_down_is_down_whatever_its_docker_and_ssh_say() -> None:
    docker_up = probe(Status.UP, name="n/docker", kind="docker")
    ssh_up = probe(Status.UP, name="n/ssh", kind="ssh")
    llama_down = [probe(Status.DOWN, name=f"n/llamacpp/m{i}", kind="llamacpp") for i in range(2)]
    assert tier_verdict([docker_up, ssh_up, *llama_down]) is Verdict.DOWN
    assert tier_verdict([docker_up, ssh_up, llama_down[0], probe(Status.STARTING, kind="llamacpp")]) is Verdict.DEGRADED
    # Docker down while the model servers still answer: degraded, not down
    assert tier_verdict([probe(Status.DOWN, name="n/docker", kind="docker"), probe(Status.UP)]) is Verdict.DEGRADED
    # a tier with nothing that serves (no model placed there): its machines decide
    assert tier_verdict([docker_up, probe(Status.DOWN, name="n/ssh", kind="ssh")]) is Verdict.DEGRADED
    assert tier_verdict([probe(Status.DOWN, name="n/ssh", kind="ssh")]) is Verdict.DOWN


def tiers(**verdicts: Status) -> list[TierHealth]:
    out = []
    for tier, status in verdicts.items():
        p = probe(status, tier, f"{tier}-node/x")
        out.append(TierHealth(tier, tier_verdict([p]), (p,)))
    return out


def test_prognosis() -> None:
    assert prognosis(tiers(local=Status.UP, remote=Status.UP, gateway=Status.UP)) == (
        Verdict.HEALTHY,
        "all 3 tiers healthy",
    )
    assert prognosis(tiers(local=Status.UP, remote=Status.DOWN, gateway=Status.UP)) == (
        Verdict.DEGRADED,
        "remote DOWN (remote-node/x: down); requests fall back to the other tiers",
    )
    assert prognosis(tiers(local=Status.UP, gateway=Status.DOWN)) == (
        Verdict.DEGRADED,
        "gateway DOWN (gateway-node/x: down); apps using the gateway are cut off",
    )
    verdict, reason = prognosis(tiers(local=Status.DOWN, cpu=Status.DOWN, gateway=Status.UP))
    assert verdict is Verdict.DOWN and reason.startswith("nothing can serve: local DOWN")


# --------------------------------------------------------------------------- endpoints


SPEC = """\
cluster: {{name: lab}}
nodes:
  - name: box
    tier: remote
    address: 127.0.0.1
    docker: {{endpoint: "unix:///tmp/hl-none/docker.sock"}}
    ssh: {{user: root, port: {ssh}}}
    gpus: [{{index: 0, name: g, vram: 24GiB}}]
    ram: 32GiB
    llamacpp: {{image: llama, ports: {llama}-{llama}}}
  - name: desk
    tier: local
    address: 127.0.0.1
    ram: 32GiB
    ollama: {{url: "http://127.0.0.1:{ollama}"}}
  - name: nas
    tier: cpu
    address: 127.0.0.1
    ram: 8GiB
    ollama: {{url: "http://127.0.0.1:{ollama2}"}}
models:
  - name: coder
    runtime: llamacpp
    source: {{gguf: /m/coder.gguf}}
    memory: {{vram: 4GiB, layers: 28}}
gateway: {{node: desk, port: {gateway}, master_key: "env:LITELLM_MASTER_KEY"}}
health:
  timeout: {timeout}
  slow_threshold: 2s
  timeouts: {{gateway: {gateway_timeout}, coder: 3s}}
"""


def spec_text(**ports: object) -> str:
    values: dict[str, object] = {"timeout": "1s", "gateway_timeout": "1s"}
    values.update(ports)
    return SPEC.format(**values)


def test_endpoints_and_their_timeouts() -> None:
    from tests.support.wiring import desired_of

    spec = parse_spec(spec_text(ssh=2222, llama=3000, ollama=11434, ollama2=11435, gateway=4000), "x.yaml").spec
    eps = {e.name: e for e in endpoints(spec, desired_of(spec))}
    assert sorted(eps) == [
        "box/docker",
        "box/llamacpp/coder",
        "box/ssh",
        "desk/ollama",
        "gateway/litellm",
        "nas/ollama",
    ]
    assert eps["box/llamacpp/coder"].target == "http://127.0.0.1:3000/health"
    assert eps["box/llamacpp/coder"].timeout == 3.0  # per-model timeout wins
    assert eps["gateway/litellm"].target == "http://127.0.0.1:4000/health/liveliness"  # never /health
    assert eps["box/ssh"].target == "127.0.0.1:2222"
    assert eps["desk/ollama"].target == "http://127.0.0.1:11434/api/tags"
    assert {e.tier for e in eps.values()} == {"remote", "local", "cpu", "gateway"}


# --------------------------------------------------------------------------- probes


def test_probes_against_real_sockets(stubs: StubServers) -> None:
    ok = stubs.start(Behaviour(200))
    loading = stubs.start(Behaviour(503))
    slow = stubs.start(Behaviour(200, delay=0.3))
    hung = stubs.start(Behaviour(hang=True))
    ssh = stubs.start(Behaviour(banner=b"SSH-2.0-OpenSSH_9.2"))
    closed = free_port()
    eps = [
        ep("a/ollama", target=f"http://127.0.0.1:{ok}/api/tags"),
        ep("a/llamacpp/m", kind="llamacpp", target=f"http://127.0.0.1:{loading}/health"),
        ep("b/ollama", target=f"http://127.0.0.1:{loading}/api/tags"),
        ep("c/ollama", target=f"http://127.0.0.1:{slow}/api/tags"),
        ep("d/ollama", target=f"http://127.0.0.1:{hung}/api/tags", timeout=0.3),
        ep("e/ollama", target=f"http://127.0.0.1:{closed}/api/tags"),
        ep("f/ssh", kind="ssh", target=f"127.0.0.1:{ssh}"),
        ep("g/ssh", kind="ssh", target=f"127.0.0.1:{ok}", timeout=0.3),
        ep("h/docker", kind="docker", target="unix:///tmp/hl-none/docker.sock"),
    ]
    got = {p.endpoint.name: (p.status, p.code, p.error) for p in asyncio.run(probe_all(eps, slow_threshold=0.1))}
    assert got == {
        "a/ollama": (Status.UP, 200, None),
        "a/llamacpp/m": (Status.STARTING, 503, "loading the model"),
        "b/ollama": (Status.DOWN, 503, "HTTP 503"),
        "c/ollama": (Status.SLOW, 200, None),
        "d/ollama": (Status.DOWN, None, "no answer within 0.3s"),
        "e/ollama": (Status.DOWN, None, "Connection refused"),
        "f/ssh": (Status.UP, None, None),
        "g/ssh": (Status.DOWN, None, "no answer within 0.3s"),  # an HTTP server says nothing first
        "h/docker": (Status.DOWN, None, "No such file or directory"),
    }


def test_a_hung_gateway_never_blocks_health(
    stubs: StubServers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok = stubs.start(Behaviour(200))
    hung = stubs.start(Behaviour(hang=True))
    text = spec_text(ssh=stubs.start(Behaviour(banner=b"SSH-2.0-x")), llama=stubs.start(Behaviour(200)), ollama=ok,
                     ollama2=ok, gateway=hung, gateway_timeout="0.5s")  # fmt: skip
    text = text.replace('docker: {endpoint: "unix:///tmp/hl-none/docker.sock"}\n    ', "")
    text = text.replace(
        "llamacpp: {image: llama,",
        'docker: {endpoint: "unix:///tmp/hl-none/docker.sock"}\n    llamacpp: {image: llama,',
    )
    (tmp_path / "cluster.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["health", "--json"])
    report = json.loads(result.stdout)
    assert report["tiers"]["gateway"]["verdict"] == "DOWN"
    gw = report["tiers"]["gateway"]["endpoints"][0]
    assert (gw["status"], gw["error"]) == ("down", "no answer within 0.5s")
    assert report["tiers"]["local"]["verdict"] == "HEALTHY"
    assert report["verdict"] == "DEGRADED" and result.exit_code == 1
    assert "apps using the gateway are cut off" in report["reason"]


def only_ollama(ports: list[int]) -> str:
    nodes = "".join(
        f'  - {{name: n{i}, tier: local, address: 127.0.0.1, ram: 8GiB, ollama: {{url: "http://127.0.0.1:{p}"}}}}\n'
        for i, p in enumerate(ports)
    )
    return f"cluster: {{name: lab}}\nnodes:\n{nodes}health: {{timeout: 1s}}\n"


@pytest.mark.parametrize(
    ("alive", "code", "verdict"),
    [((True, True), 0, "HEALTHY"), ((True, False), 1, "DEGRADED"), ((False, False), 2, "DOWN")],
)
def test_exit_codes(stubs: StubServers, tmp_path: Path, alive: tuple[bool, bool], code: int, verdict: str) -> None:
    ports = [stubs.start(Behaviour(200)) if up else free_port() for up in alive]
    (tmp_path / "c.yaml").write_text(only_ollama(ports))
    result = CliRunner().invoke(app, ["health", "-f", str(tmp_path / "c.yaml")])
    assert result.exit_code == code, result.output
    assert f"prognosis: {verdict}" in result.stdout
    assert "Traceback" not in result.output


def test_classify_orders_tiers() -> None:
    report = classify([probe(Status.UP, "gateway"), probe(Status.UP, "cpu"), probe(Status.UP, "local")])
    assert [t.tier for t in report.tiers] == ["local", "cpu", "gateway"]
