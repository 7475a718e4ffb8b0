"""Health per tier: probe every endpoint of the cluster at once, each with its own timeout.

    Ollama       GET {ollama.url}/api/tags
    llama.cpp    GET http://NODE:PORT/health        (503 while loading: STARTING, not down), then /v1/models must
                                                    list its alias (else another server holds the port: DOWN)
    swap pool    GET http://NODE:PORT/v1/models     (per member: loaded UP, loading STARTING, unloaded or
                                                     asleep IDLE — it loads on request —, a failed load DOWN)
    LiteLLM      GET {gateway}/health/liveliness    (never /health: it calls every model and hangs)
    Docker       GET /_ping on the engine           (unix:// and tcp://; ssh:// through the SDK)
    SSH          the port answers with an SSH banner

A hung endpoint costs its own timeout and nothing more: all probes run
concurrently, so a sweep takes about as long as the slowest timeout.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpx

from controller.core.gateway_config import gateway_url
from controller.core.state import ClusterState, url_host
from controller.drivers.base import DriverError
from controller.drivers.docker import DockerEngine
from controller.drivers.httpjson import MAX_BYTES, BadAnswer, read_capped_async
from controller.drivers.llamacpp import FAILED, LOADED, LOADING, SLEEPING, listed_ids, parse_router_models
from specs.jsontext import loads
from specs.model import ClusterSpec, Node

GATEWAY_TIER = "gateway"


class Status(StrEnum):
    UP = "up"
    SLOW = "slow"
    STARTING = "starting"
    IDLE = "idle"
    """An on-demand model that is not loaded now: it loads on the next request. Neither down nor degraded."""
    DOWN = "down"
    ASLEEP = "asleep"
    """Does not answer because homelab put its node to sleep (`power`): not a failure."""


ANSWERING = frozenset({Status.UP, Status.IDLE})
"""What a tier may hold and still be HEALTHY (an idle on-demand model is as it should be)."""
ROUTABLE = frozenset({Status.UP, Status.SLOW, Status.IDLE})
"""What can take a request now (an idle on-demand model is loaded by it)."""


class Verdict(StrEnum):
    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"
    DOWN = "DOWN"
    ASLEEP = "ASLEEP"
    """Every endpoint of the tier that does not answer is on a node homelab put to sleep on purpose."""


EXIT_CODES = {Verdict.HEALTHY: 0, Verdict.DEGRADED: 1, Verdict.DOWN: 2, Verdict.ASLEEP: 0}


@dataclass(frozen=True)
class Endpoint:
    name: str
    """`node/kind[/model]`, or `gateway/litellm`."""
    tier: str
    kind: str
    """ollama, llamacpp, litellm, docker or ssh."""
    target: str
    """The URL probed (or host:port for ssh, the engine endpoint for docker)."""
    timeout: float
    node: str | None = None
    model: str | None = None
    served: str | None = None
    """kind `llamapool`: the member's alias in the router's `/v1/models`; kind `llamacpp`: the container's
    `--alias`, which its `/v1/models` must list (the server there is the one homelab started)."""


@dataclass(frozen=True)
class Probe:
    endpoint: Endpoint
    status: Status
    code: int | None = None
    latency: float | None = None
    """Seconds until the answer (None when there was none)."""
    error: str | None = None
    models: tuple[str, ...] | None = None
    """Ollama: the models `/api/tags` lists (routing checks that the derived model is among them)."""

    def to_json(self) -> dict[str, Any]:
        e = self.endpoint
        return {
            "name": e.name,
            "tier": e.tier,
            "kind": e.kind,
            "node": e.node,
            "model": e.model,
            "target": e.target,
            "timeout": e.timeout,
            "status": self.status.value,
            "code": self.code,
            "latency_ms": round(self.latency * 1000, 1) if self.latency is not None else None,
            "error": self.error,
        }


@dataclass(frozen=True)
class TierHealth:
    tier: str
    verdict: Verdict
    probes: tuple[Probe, ...]


@dataclass(frozen=True)
class HealthReport:
    tiers: tuple[TierHealth, ...]
    verdict: Verdict
    reason: str
    elapsed: float

    @property
    def probes(self) -> tuple[Probe, ...]:
        return tuple(p for t in self.tiers for p in t.probes)

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict.value,
            "reason": self.reason,
            "elapsed_ms": round(self.elapsed * 1000, 1),
            "tiers": {
                t.tier: {"verdict": t.verdict.value, "endpoints": [p.to_json() for p in t.probes]} for t in self.tiers
            },
        }

    def healthy_models(self) -> dict[str, bool]:
        """Model name → its endpoint answered (up or slow). For routing."""
        out: dict[str, bool] = {}
        for p in self.probes:
            if p.endpoint.model is not None:
                out[p.endpoint.model] = p.status in ROUTABLE
        return out


# --------------------------------------------------------------------------- which endpoints


def timeout_for(spec: ClusterSpec, *names: str | None) -> float:
    """The first per-target timeout of `health.timeouts` among names (model, node, gateway), else the default."""
    for name in names:
        if name is not None and name in spec.health.timeouts:
            return spec.health.timeouts[name]
    return spec.health.timeout


def endpoints(spec: ClusterSpec, desired: ClusterState | None = None) -> list[Endpoint]:
    """Every endpoint of the cluster: per node its engine, SSH and runtimes; each llama.cpp container; the gateway."""
    out: list[Endpoint] = []
    for node in spec.nodes:
        tier = node.tier.value
        if node.docker is not None:
            out.append(
                Endpoint(
                    f"{node.name}/docker", tier, "docker", node.docker.endpoint, timeout_for(spec, node.name), node.name
                )
            )
        if node.ssh is not None:
            out.append(
                Endpoint(
                    f"{node.name}/ssh",
                    tier,
                    "ssh",
                    f"{node.address}:{node.ssh.port}",
                    timeout_for(spec, node.name),
                    node.name,
                )
            )
        if node.ollama is not None:
            url = node.ollama.url.rstrip("/") + "/api/tags"
            out.append(Endpoint(f"{node.name}/ollama", tier, "ollama", url, timeout_for(spec, node.name), node.name))
        if desired is not None and node.name in desired.nodes:
            for c in desired.nodes[node.name].containers:
                if c.config is not None and c.pool:
                    models_url = c.health_url.removesuffix("/health") + "/v1/models"
                    out.extend(
                        Endpoint(
                            f"{node.name}/llamacpp/{m.model}",
                            tier,
                            "llamapool",
                            models_url,
                            timeout_for(spec, m.model, node.name),
                            node.name,
                            m.model,
                            m.alias,
                        )
                        for m in c.config.members
                    )
                    continue
                out.append(
                    Endpoint(
                        f"{node.name}/llamacpp/{c.model}",
                        tier,
                        "llamacpp",
                        c.health_url,
                        timeout_for(spec, c.model, node.name),
                        node.name,
                        c.model,
                        c.config.alias if c.config is not None and c.config.alias else None,
                    )
                )
    gw = spec.gateway
    if gw is not None:
        # a proxy on no node (mode process or external) is at `gateway.host`, as the gateway renders it
        base = gw.url or (_gateway_url(spec, gw.node, gw.port) if gw.node is not None else gateway_url(spec))
        if base is not None:
            out.append(
                Endpoint(
                    "gateway/litellm",
                    GATEWAY_TIER,
                    "litellm",
                    base.rstrip("/") + "/health/liveliness",
                    timeout_for(spec, "gateway"),
                    gw.node,
                )
            )
    return out


def _gateway_url(spec: ClusterSpec, node_name: str | None, port: int) -> str | None:
    node: Node | None = next((n for n in spec.nodes if n.name == node_name), None)
    if node is None:
        return None
    return f"http://{url_host(node.address)}:{port}"


# --------------------------------------------------------------------------- probing


async def _probe_http(client: httpx.AsyncClient, e: Endpoint, slow: float) -> Probe:
    start = time.perf_counter()
    try:
        code, raw = await asyncio.wait_for(
            read_capped_async(client, "GET", e.target, what=e.target, timeout=e.timeout), e.timeout
        )
    except (TimeoutError, httpx.TimeoutException):
        return Probe(e, Status.DOWN, error=f"no answer within {e.timeout:g}s")
    except httpx.HTTPError as exc:
        return Probe(e, Status.DOWN, error=_short(exc))
    except BadAnswer:
        return Probe(e, Status.DOWN, error=f"an answer larger than {MAX_BYTES} bytes")
    latency = time.perf_counter() - start
    if e.kind == "llamacpp" and code == 503:
        return Probe(e, Status.STARTING, code, latency, "loading the model")
    if not 200 <= code < 300:
        return Probe(e, Status.DOWN, code, latency, f"HTTP {code}")
    status = Status.SLOW if latency > slow else Status.UP
    if e.kind == "llamacpp" and e.served is not None:
        return await _llamacpp_identity(client, e, status, code, latency)
    if e.kind == "llamapool":
        return _pool_member(e, httpx.Response(code, content=raw), status, latency)
    if e.kind == "ollama":
        data = _json_or_none(raw)
        listed = (data.get("models") or []) if isinstance(data, dict) else None
        if not isinstance(listed, list):
            return Probe(e, Status.DOWN, code, latency, "/api/tags did not answer JSON")
        names = tuple(
            name for m in listed if isinstance(m, dict) and isinstance(name := m.get("name") or m.get("model"), str)
        )
        return Probe(e, status, code, latency, models=names)
    return Probe(e, status, code, latency)


def _json_or_none(raw: bytes) -> Any:
    try:
        return loads(raw)
    except ValueError:
        return None


async def _llamacpp_identity(
    client: httpx.AsyncClient, e: Endpoint, answered: Status, code: int, latency: float
) -> Probe:
    """A model's container answered /health: it is up only if the server there is the one homelab started (its
    `--alias` on `/v1/models`); a server squatting the port is DOWN, named."""
    url = e.target.removesuffix("/health") + "/v1/models"
    try:
        r = await asyncio.wait_for(client.get(url, timeout=e.timeout), e.timeout)
    except (TimeoutError, httpx.HTTPError) as exc:
        return Probe(e, Status.DOWN, code, latency, f"{url}: {_short(exc) if str(exc) else 'no answer'}")
    server = f" (Server: {r.headers['server'][:60]})" if r.headers.get("server") else ""
    try:
        got = listed_ids(r.json()) if r.status_code == 200 else None
    except ValueError:
        got = None
    if got is None:
        why = f"{url} answered HTTP {r.status_code}{server}: not its llama-server"
        return Probe(e, Status.DOWN, code, latency, why)
    if e.served not in got:
        listed = ", ".join(sorted(got)[:5]) or "no models"
        return Probe(e, Status.DOWN, code, latency, f"another server holds the port: it serves {listed}{server}")
    return Probe(e, answered, code, latency)


def _pool_member(e: Endpoint, r: httpx.Response, answered: Status, latency: float) -> Probe:
    """One member of a swap pool, from its router's `/v1/models` (the answer as read, bounded)."""
    code = r.status_code
    try:
        states = parse_router_models(_json_or_none(r.content))
    except DriverError:
        return Probe(e, Status.DOWN, code, latency, "/v1/models did not answer a router's model list")
    got = states.get(e.served or "")
    if got is None:
        return Probe(e, Status.DOWN, code, latency, f"'{e.served}' is not among the router's models")
    if got.state == LOADED:
        return Probe(e, answered, code, latency)
    if got.state == LOADING:
        return Probe(e, Status.STARTING, code, latency, "loading the model")
    if got.state == FAILED:
        exit_code = f" (exit {got.exit_code})" if got.exit_code is not None else ""
        return Probe(e, Status.DOWN, code, latency, f"its last load failed{exit_code}")
    why = "asleep after its ttl" if got.state == SLEEPING else "not loaded"
    return Probe(e, Status.IDLE, code, latency, f"{why}: loads on request")


async def _probe_ssh(e: Endpoint, slow: float) -> Probe:
    host, _, port = e.target.rpartition(":")
    host = host.strip("[]")
    start = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), e.timeout)
        banner = await asyncio.wait_for(reader.readline(), max(0.01, e.timeout - (time.perf_counter() - start)))
    except TimeoutError:
        return Probe(e, Status.DOWN, error=f"no answer within {e.timeout:g}s")
    except OSError as exc:
        return Probe(e, Status.DOWN, error=exc.strerror or type(exc).__name__)
    finally:
        if writer is not None:
            writer.close()
    latency = time.perf_counter() - start
    if not banner.startswith(b"SSH-"):
        return Probe(e, Status.DOWN, latency=latency, error="not an SSH server")
    return Probe(e, Status.SLOW if latency > slow else Status.UP, latency=latency)


async def _probe_docker(e: Endpoint, slow: float) -> Probe:
    """GET /_ping; unix:// through the socket, tcp:// over HTTP, ssh:// through the SDK in a thread."""
    if e.target.startswith("unix://"):
        transport = httpx.AsyncHTTPTransport(uds=e.target.removeprefix("unix://"))
        async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
            return _as_docker(await _probe_http(client, _retarget(e, "http://docker/_ping"), slow), e)
    if e.target.startswith("tcp://"):
        async with httpx.AsyncClient(trust_env=False) as client:
            url = "http://" + e.target.removeprefix("tcp://").rstrip("/") + "/_ping"
            return _as_docker(await _probe_http(client, _retarget(e, url), slow), e)
    return await _probe_docker_sdk(e, slow)


async def _probe_docker_sdk(e: Endpoint, slow: float) -> Probe:
    def ping() -> None:
        node = Node.model_validate(
            {"name": e.node or "node", "tier": "cpu", "address": "localhost", "ram": 1,
             "docker": {"endpoint": e.target, "timeout": e.timeout}, "llamacpp": {"image": "x", "ports": "1-1"}}
        )  # fmt: skip
        with DockerEngine(node, "health", timeout=e.timeout) as engine:
            engine.ping()

    start = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.to_thread(ping), e.timeout)
    except TimeoutError:
        return Probe(e, Status.DOWN, error=f"no answer within {e.timeout:g}s")
    except DriverError as exc:
        return Probe(e, Status.DOWN, error=str(exc).rsplit(": ", 1)[-1])
    latency = time.perf_counter() - start
    return Probe(e, Status.SLOW if latency > slow else Status.UP, 200, latency)


def _retarget(e: Endpoint, url: str) -> Endpoint:
    return Endpoint(e.name, e.tier, e.kind, url, e.timeout, e.node, e.model, e.served)


def _as_docker(p: Probe, e: Endpoint) -> Probe:
    return Probe(e, p.status, p.code, p.latency, p.error)


def _short(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:  # httpx wraps the socket error that says what happened
        if isinstance(cause, OSError) and (cause.strerror or cause.errno):
            return os.strerror(cause.errno) if cause.errno else str(cause.strerror)
        cause = cause.__cause__ or cause.__context__
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if "refused" in lowered:
        return "connection refused"
    if "no such file" in lowered:
        return "no such socket"
    return text.splitlines()[0][:120]


async def probe_all(eps: Sequence[Endpoint], slow_threshold: float) -> list[Probe]:
    """Probe every endpoint concurrently; each costs at most its own timeout."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, trust_env=False, follow_redirects=False) as client:

        async def one(e: Endpoint) -> Probe:
            if e.kind == "ssh":
                return await _probe_ssh(e, slow_threshold)
            if e.kind == "docker":
                return await _probe_docker(e, slow_threshold)
            return await _probe_http(client, e, slow_threshold)

        return list(await asyncio.gather(*(one(e) for e in eps)))


# --------------------------------------------------------------------------- verdicts


SERVING_KINDS = frozenset({"ollama", "llamacpp", "llamapool", "litellm"})
"""Endpoints that answer requests; Docker and SSH only say the machine is there."""


def tier_verdict(probes: Iterable[Probe]) -> Verdict:
    """HEALTHY: everything answers in time (an idle on-demand model counts as answering). DOWN: nothing
    answers, or nothing that serves requests does (a tier whose model servers are all down serves nothing,
    however well its Docker and SSH answer).
    DEGRADED: anything in between (some down, some slower than the threshold, or a llama.cpp server still
    loading its model)."""
    probes = list(probes)
    if probes and all(p.status is Status.ASLEEP for p in probes):
        return Verdict.ASLEEP
    probes = [p for p in probes if p.status is not Status.ASLEEP]  # asleep on purpose: neither up nor down
    statuses = [p.status for p in probes]
    serving = [p.status for p in probes if p.endpoint.kind in SERVING_KINDS]
    if not statuses or all(s in ANSWERING for s in statuses):
        return Verdict.HEALTHY
    if all(s is Status.DOWN for s in statuses) or (serving and all(s is Status.DOWN for s in serving)):
        return Verdict.DOWN
    return Verdict.DEGRADED


TIER_ORDER = ("local", "remote", "cpu", GATEWAY_TIER)


def classify(probes: Sequence[Probe], elapsed: float = 0.0) -> HealthReport:
    by_tier: dict[str, list[Probe]] = {}
    for p in probes:
        by_tier.setdefault(p.endpoint.tier, []).append(p)
    tiers = tuple(
        TierHealth(t, tier_verdict(by_tier[t]), tuple(by_tier[t]))
        for t in sorted(by_tier, key=lambda t: (TIER_ORDER.index(t) if t in TIER_ORDER else 99, t))
    )
    verdict, reason = prognosis(tiers)
    return HealthReport(tiers, verdict, reason, elapsed)


def prognosis(tiers: Sequence[TierHealth]) -> tuple[Verdict, str]:
    """The cluster's verdict and a one-line reason."""
    if not tiers:
        return Verdict.HEALTHY, "no endpoints to check"
    down = [t for t in tiers if t.verdict is Verdict.DOWN]
    degraded = [t for t in tiers if t.verdict is Verdict.DEGRADED]
    asleep = [t.tier for t in tiers if t.verdict is Verdict.ASLEEP]
    serving = [t for t in tiers if t.tier != GATEWAY_TIER and t.verdict is not Verdict.DOWN]
    if not down and not degraded:
        if asleep:
            awake = len(tiers) - len(asleep)
            return Verdict.HEALTHY, f"{awake} tiers healthy; {', '.join(asleep)} ASLEEP (woken on demand)"
        return Verdict.HEALTHY, f"all {len(tiers)} tiers healthy"
    worst = [*down, *degraded]
    details = "; ".join(f"{t.tier} {t.verdict.value} ({_first_problem(t)})" for t in worst)
    if len(down) == len(tiers) or not serving:
        return Verdict.DOWN, f"nothing can serve: {details}"
    gateway_down = any(t.tier == GATEWAY_TIER for t in down)
    tail = "; apps using the gateway are cut off" if gateway_down else "; requests fall back to the other tiers"
    return Verdict.DEGRADED, details + tail


def _first_problem(t: TierHealth) -> str:
    bad = [p for p in t.probes if p.status not in ANSWERING]
    if not bad:
        return "ok"
    p = bad[0]
    what = p.error or p.status.value
    more = f", +{len(bad) - 1} more" if len(bad) > 1 else ""
    return f"{p.endpoint.name}: {what}{more}"


def mark_asleep(report: HealthReport, asleep: Iterable[str]) -> HealthReport:
    """The report with every endpoint of a node homelab put to sleep that does not answer marked ASLEEP, and the
    verdicts again: a tier asleep on purpose is ASLEEP (exit 0), not DOWN. An endpoint that answers stays as it
    is (the node was woken)."""
    names = set(asleep)
    if not names:
        return report
    probes = [
        Probe(p.endpoint, Status.ASLEEP, error="asleep (homelab put the node to sleep)")
        if p.endpoint.node in names and p.endpoint.tier != GATEWAY_TIER and p.status is Status.DOWN
        else p
        for p in report.probes
    ]
    return classify(probes, report.elapsed)


def check(spec: ClusterSpec, desired: ClusterState | None = None) -> HealthReport:
    """One sweep over every endpoint of the cluster."""
    eps = endpoints(spec, desired)
    start = time.perf_counter()
    probes = asyncio.run(probe_all(eps, spec.health.slow_threshold))
    return classify(probes, time.perf_counter() - start)
