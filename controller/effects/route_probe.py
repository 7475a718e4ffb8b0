"""Is a routing candidate up? `controller.effects.health` probes, for `homelab route`.

The candidates' endpoints are probed with `controller.effects.health.probe_all`, all at once,
each with its timeout from the spec (`health.timeouts` by model, then by node, then
`health.timeout`), and read for routing:

- llama.cpp `GET /health`: up (or slow) is healthy; 503 means the model is still
  loading, which is not healthy for routing (a request would wait or fail);
- Ollama `GET /api/tags`: up, and the derived model (`homelab/<model>:latest`) listed.

A result younger than `health.interval` is reused from `HealthCache` (a JSON file in the
state directory) instead of probing again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from controller.core.classifier import EmbeddingStage
from controller.core.routing import Endpoint, EndpointHealth, HealthView, RouteError, choose, embedding_stage
from controller.effects import health
from specs.enums import Category, Runtime
from specs.files import atomic_write
from specs.model import ClusterSpec


@dataclass(frozen=True)
class Probed:
    """What one URL answered: ok or why not, and (Ollama) the models it lists."""

    ok: bool
    reason: str = ""
    models: tuple[str, ...] | None = None
    at: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "reason": self.reason, "models": self.models, "at": self.at}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Probed:
        models = data.get("models")
        at = data.get("at", 0.0)
        return cls(
            ok=bool(data.get("ok")),
            reason=str(data.get("reason", "")),
            models=tuple(str(m) for m in models) if isinstance(models, list) else None,
            at=float(at) if isinstance(at, int | float) else 0.0,
        )

    @classmethod
    def of(cls, probe: health.Probe) -> Probed:
        ok = probe.status in health.ROUTABLE
        return cls(ok, "" if ok else probe.error or probe.status.value, probe.models, time.time())


def health_endpoint(spec: ClusterSpec, endpoint: Endpoint) -> health.Endpoint:
    """The `controller.effects.health` endpoint that answers for a routing endpoint."""
    kind = "ollama" if endpoint.runtime is Runtime.OLLAMA else "llamacpp"
    return health.Endpoint(
        name=f"{endpoint.node}/{kind}/{endpoint.model}",
        tier=endpoint.tier.value,
        kind=kind,
        target=endpoint.health_url,
        timeout=health.timeout_for(spec, endpoint.model, endpoint.node),
        node=endpoint.node,
        model=endpoint.model,
        served=endpoint.served_model if kind == "llamacpp" else None,  # its /v1/models must list it
    )


def endpoint_health(endpoint: Endpoint, probed: Probed) -> EndpointHealth:
    """What a URL's answer means for one endpoint behind it."""
    if not probed.ok:
        return EndpointHealth(False, probed.reason)
    if endpoint.runtime is Runtime.OLLAMA and probed.models is not None and endpoint.served_model not in probed.models:
        return EndpointHealth(False, f"Ollama does not list {endpoint.served_model}")
    return EndpointHealth(True)


class HealthCache:
    """Probe results by URL in a JSON file; a result younger than `ttl` seconds is reused."""

    def __init__(self, path: Path | None, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.ttl = ttl
        self.clock = clock
        self.results: dict[str, Probed] = {}
        if path is not None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}
            if isinstance(data, dict):
                for url, entry in data.items():
                    if isinstance(entry, dict):
                        self.results[str(url)] = Probed.from_json(entry)

    def fresh(self, url: str) -> Probed | None:
        found = self.results.get(url)
        if found is None or self.clock() - found.at >= self.ttl:
            return None
        return found

    def update(self, results: Mapping[str, Probed]) -> None:
        """Keep new results, stamped with this cache's clock."""
        now = self.clock()
        self.results.update({url: replace(p, at=now) for url, p in results.items()})
        if self.path is None or not results:
            return
        keep = {u: p.to_json() for u, p in self.results.items() if self.clock() - p.at < self.ttl}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(keep, indent=1, sort_keys=True) + "\n", keep_previous=False)
        except OSError:
            pass  # a cache that cannot be written only costs a probe next time


def probe(
    spec: ClusterSpec, endpoints: Iterable[Endpoint], cache: HealthCache | None = None
) -> dict[Endpoint, EndpointHealth]:
    """The health of each endpoint: from the cache when fresh, else probed now (concurrently)."""
    wanted = list(endpoints)
    targets: dict[str, health.Endpoint] = {}
    known: dict[str, Probed] = {}
    for e in wanted:
        cached = cache.fresh(e.health_url) if cache is not None else None
        if cached is not None:
            known[e.health_url] = cached
            continue
        target = health_endpoint(spec, e)
        previous = targets.get(e.health_url)
        if previous is None or previous.timeout < target.timeout:
            targets[e.health_url] = target
    probes = asyncio.run(health.probe_all(list(targets.values()), spec.health.slow_threshold)) if targets else []
    fresh = {p.endpoint.target: Probed.of(p) for p in probes}
    if cache is not None:
        cache.update(fresh)
    known.update(fresh)
    return {e: endpoint_health(e, known[e.health_url]) for e in wanted}


EMBED_CACHE_FILE = "routing-embeddings.json"
"""The example embeddings of the routing classifier's embedding stage, in the state directory."""


def embedding_stage_for(
    spec: ClusterSpec,
    endpoints: Mapping[str, Sequence[Endpoint]],
    health: HealthView | None,
    state_dir: Path | None,
) -> tuple[EmbeddingStage | None, str]:
    """The embedding stage through the cluster's embed model (`routing.embedding_model`, else the embed
    category's first healthy model), with its example embeddings ready; or None and why not."""
    if not spec.routing.embedding:
        return None, "routing.embedding is off"
    try:
        if spec.routing.embedding_model is not None:
            replicas = [e for e in endpoints.get(spec.routing.embedding_model, ()) if health is None or _up(health(e))]
            if not replicas:
                return None, f"embed model '{spec.routing.embedding_model}' is not placed or not up: rules only"
            endpoint = replicas[0]
        else:
            endpoint = choose(spec, Category.EMBED, endpoints, health).endpoint
    except RouteError as exc:
        return None, f"no embed model: {exc}: rules only"
    base = endpoint.url if endpoint.runtime is Runtime.LLAMACPP else endpoint.url.rstrip("/") + "/v1"
    cache = str(state_dir / EMBED_CACHE_FILE) if state_dir is not None else None
    stage = embedding_stage(spec.routing, base, endpoint.served_model, cache)
    why = stage.prepare()
    return (stage, "") if not why else (None, f"{why}: rules only")


def _up(answer: EndpointHealth | bool | None) -> bool:
    return answer is None or (answer if isinstance(answer, bool) else answer.healthy)
