"""Is a routing candidate up? A small concurrent HTTP probe for `homelab route`.

- llama.cpp: `GET /health` — 200 is healthy; 503 means the model is still loading,
  which is not healthy for routing (a request would wait or fail);
- Ollama: `GET /api/tags` — 200 and the derived model (`homelab/<model>:latest`) listed.

Only the candidates' endpoints are probed, all at once, each with its timeout from the
spec (`health.timeouts` by model, then by node, then `health.timeout`). A result younger
than `health.interval` is reused from `HealthCache` (a JSON file in the state directory)
instead of probing again. The health module may later answer for this one: anything that
returns `EndpointHealth` per `Endpoint` fits `controller.routing.HealthView`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from controller.routing import Endpoint, EndpointHealth
from specs.enums import Runtime
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


def timeout_for(spec: ClusterSpec, endpoint: Endpoint) -> float:
    """The endpoint's probe timeout: `health.timeouts` by model, then by node, then `health.timeout`."""
    timeouts = spec.health.timeouts
    return timeouts.get(endpoint.model, timeouts.get(endpoint.node, spec.health.timeout))


def endpoint_health(endpoint: Endpoint, probed: Probed) -> EndpointHealth:
    """What a URL's answer means for one endpoint behind it."""
    if not probed.ok:
        return EndpointHealth(False, probed.reason)
    if endpoint.runtime is Runtime.OLLAMA and probed.models is not None and endpoint.served_model not in probed.models:
        return EndpointHealth(False, f"Ollama does not list {endpoint.served_model}")
    return EndpointHealth(True)


async def _probe_one(client: httpx.AsyncClient, url: str, runtime: Runtime, timeout: float) -> Probed:
    now = time.time()
    try:
        response = await client.get(url, timeout=timeout)
    except httpx.TimeoutException:
        return Probed(False, f"no answer within {timeout:g}s", at=now)
    except httpx.ConnectError as exc:
        reason = "connection refused" if _refused(exc) else f"cannot connect ({_short(exc)})"
        return Probed(False, reason, at=now)
    except httpx.HTTPError as exc:
        return Probed(False, f"HTTP error ({_short(exc)})", at=now)
    if response.status_code == 503:
        return Probed(False, "loading (HTTP 503)", at=now)
    if response.status_code != 200:
        return Probed(False, f"HTTP {response.status_code}", at=now)
    if runtime is Runtime.OLLAMA:
        try:
            listed = response.json().get("models", [])
            names = tuple(str(m.get("name") or m.get("model")) for m in listed if isinstance(m, dict))
        except (ValueError, AttributeError):
            return Probed(False, "Ollama /api/tags did not answer JSON", at=now)
        return Probed(True, models=names, at=now)
    return Probed(True, at=now)


def _refused(exc: BaseException) -> bool:
    """Whether a connect error comes from a refused connection (httpx wraps the OSError)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError) or "refused" in str(seen).lower():
            return True
        if isinstance(seen, BaseExceptionGroup):
            return any(_refused(e) for e in seen.exceptions)
        seen = seen.__cause__ or seen.__context__
    return False


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__


async def probe_urls(targets: Mapping[str, tuple[Runtime, float]]) -> dict[str, Probed]:
    """Probe every URL at once: url → (runtime, timeout) in, url → what it answered out."""
    if not targets:
        return {}
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as client:
        urls = list(targets)
        answers = await asyncio.gather(*(_probe_one(client, u, *targets[u]) for u in urls))
    return dict(zip(urls, answers, strict=True))


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
        from specs.files import atomic_write

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
    targets: dict[str, tuple[Runtime, float]] = {}
    known: dict[str, Probed] = {}
    for e in wanted:
        cached = cache.fresh(e.health_url) if cache is not None else None
        if cached is not None:
            known[e.health_url] = cached
            continue
        timeout = timeout_for(spec, e)
        previous = targets.get(e.health_url)
        targets[e.health_url] = (e.runtime, max(timeout, previous[1]) if previous else timeout)
    fresh = asyncio.run(probe_urls(targets)) if targets else {}
    if cache is not None:
        cache.update(fresh)
    known.update(fresh)
    return {e: endpoint_health(e, known[e.health_url]) for e in wanted}
