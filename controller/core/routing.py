"""Expert routing: classify a request, then choose the healthy model that should serve it.

Two halves, both pure (no I/O):

- `Classifier` puts a request in one of the six `Category`s. It takes a plain
  prompt or a JSON body (OpenAI chat completions, completions or embeddings;
  an Anthropic-style top-level `system`), is deterministic, takes microseconds
  and says which signals decided. Its rules are the built-in defaults merged
  with the spec's `routing.rules`. Its core is `controller.core.classifier`, which
  needs nothing but the standard library: the gateway's classifier plugin is
  that module, run inside the LiteLLM proxy with the same rules
  (`routing_config`), so `homelab route` and the gateway's `auto` model agree.
- `choose` walks a category's preferred models, skips those that are unplaced
  or unhealthy, follows the category's `fallback`, and returns a `Route`: the
  endpoint and why it was chosen.

How a request is classified: see `controller.core.classifier`.

Errors, all one line, for the user::

    ValueError
     ├─ RequestError   the request cannot be classified (empty, malformed, wrong shape)
     └─ RouteError     no healthy model can serve it (or the spec names none)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.core import classifier as core
from controller.core.classifier import (
    CONTEXT_WEIGHT,
    THRESHOLD,
    ParsedRequest,
    RequestError,
    Signal,
    parse_json,
    parse_request,
)
from controller.core.classifier import Rule as _Rule
from controller.core.state import ClusterState, url_host
from specs.enums import Category, Runtime, Tier
from specs.errors import HomelabError
from specs.model import ClusterSpec, Routing

__all__ = [
    "CONTEXT_WEIGHT",
    "THRESHOLD",
    "Classification",
    "Classifier",
    "Endpoint",
    "EndpointHealth",
    "ParsedRequest",
    "RequestError",
    "Route",
    "RouteError",
    "Signal",
    "_Rule",
    "candidates",
    "choose",
    "classify",
    "parse_json",
    "parse_request",
    "route",
    "routing_config",
]

GROUP_PREFIX = "expert/"
"""The gateway's model group of a category: `expert/<category>` (as `controller.core.gateway_config` renders it)."""


class RouteError(HomelabError, ValueError):
    """No model can serve the request (one line, for the user)."""


# --------------------------------------------------------------------------- classifier


def routing_config(routing: Routing | None = None) -> dict[str, Any]:
    """The spec's routing rules as JSON-able data: what `controller.core.classifier.Classifier.from_config` reads
    (in homelab, and in the gateway's plugin)."""
    routing = routing or Routing()
    return {
        "rules": {
            category.value: {
                "keywords": list(rule.keywords),
                "patterns": list(rule.patterns),
                "file_extensions": list(rule.file_extensions),
                "weight": rule.weight,
                "replace_defaults": rule.replace_defaults,
            }
            for category, rule in routing.rules.items()
        },
        "default_category": routing.default_category.value,
        "fast_max_words": routing.fast_max_words,
        "examples": [{"text": e.text, "category": e.category.value} for e in routing.examples],
        "embedding": routing.embedding,
        "embedding_budget": routing.embedding_budget,
    }


def builtin_examples() -> list[core.Example]:
    """The built-in labelled examples (package data `controller/core/routing_examples.jsonl`), text categories only."""
    import json
    from importlib import resources

    text = resources.files("controller.core").joinpath(core.EXAMPLES_FILE).read_text(encoding="utf-8")
    return core.examples_from_rows([json.loads(line) for line in text.splitlines() if line.strip()])


def all_examples(routing: Routing | None = None) -> list[core.Example]:
    """The built-in examples, then the spec's `routing.examples` (which take part like the built-in ones)."""
    spec = [core.Example(e.text, e.category.value, "spec") for e in (routing or Routing()).examples]
    return [*builtin_examples(), *spec]


def embedding_stage(
    routing: Routing, base_url: str, model: str, cache_path: str | None = None, embed: core.Embedder | None = None
) -> core.EmbeddingStage:
    """The embedding stage for `routing`, asking the embed model `model` at `base_url` (OpenAI-compatible)."""
    return core.EmbeddingStage(
        all_examples(routing),
        embed or core.openai_embedder(base_url, model),
        key=f"{base_url.rstrip('/')}#{model}",
        budget=routing.embedding_budget,
        cache_path=cache_path,
    )


@dataclass(frozen=True)
class Classification:
    """A category, the signals that decided it (best first), and every category's score."""

    category: Category
    signals: tuple[str, ...]
    scores: Mapping[Category, float] = field(default_factory=dict)
    confident: bool = True
    stage: str = core.RULES
    """Which stage decided: `rules`, or `embedding` (the nearest labelled examples)."""
    neighbours: tuple[core.Neighbour, ...] = ()
    note: str = ""
    """Why the embedding stage did not decide, when it was asked."""

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "category": self.category.value,
            "stage": self.stage,
            "rules_confident": self.confident,
            "signals": list(self.signals),
            "scores": {c.value: round(s, 3) for c, s in self.scores.items() if s},
        }
        if self.neighbours:
            out["neighbours"] = [n.to_json() for n in self.neighbours]
        if self.note:
            out["embedding_note"] = self.note
        return out


class Classifier:
    """`controller.core.classifier.Classifier`, answering in `Category`s. Build once (`from_spec`), classify often."""

    def __init__(
        self,
        rules: Mapping[str, Sequence[_Rule]],
        default_category: Category = Category.CHAT,
        fast_max_words: int = 6,
    ) -> None:
        self.core = core.Classifier(rules, default_category.value, fast_max_words)
        self.two = core.TwoStageClassifier(self.core)

    @classmethod
    def from_spec(cls, routing: Routing | None = None, stage: core.EmbeddingStage | None = None) -> Classifier:
        """The defaults merged with `routing.rules`, and the spec's default category and fast limit;
        with `stage`, requests the rules are unsure of go to the embedding stage (`embedding_stage`)."""
        made = cls.__new__(cls)
        made.core = core.Classifier.from_config(routing_config(routing))
        made.two = core.TwoStageClassifier(made.core, stage)
        return made

    def classify(self, request: object) -> Classification:
        """The category of a prompt, a request body (dict) or a `ParsedRequest`."""
        got = self.two.classify(request)
        return Classification(
            Category(got.category),
            got.signals,
            {Category(c): s for c, s in got.scores.items()},
            got.confident,
            got.stage,
            got.neighbours,
            got.note,
        )


_DEFAULT: Classifier | None = None


def classify(request: object, routing: Routing | None = None) -> Classification:
    """Classify with the spec's rules (or the defaults; that classifier is built once)."""
    global _DEFAULT
    if routing is not None:
        return Classifier.from_spec(routing).classify(request)
    if _DEFAULT is None:
        _DEFAULT = Classifier.from_spec()
    return _DEFAULT.classify(request)


# --------------------------------------------------------------------------- endpoints


@dataclass(frozen=True)
class Endpoint:
    """Where one placed replica of a model answers."""

    model: str
    node: str
    tier: Tier
    runtime: Runtime
    url: str
    """The base URL a client calls: `http://<address>:<port>/v1` (llama.cpp), the node's Ollama URL."""
    health_url: str
    """What is probed: llama.cpp `/health`, Ollama `/api/tags`."""
    served_model: str
    """The name the server answers to: the llama.cpp alias, or the derived Ollama model `homelab/<model>:latest`."""


def endpoints_from_state(spec: ClusterSpec, desired: ClusterState) -> dict[str, tuple[Endpoint, ...]]:
    """model → its endpoints, from the rendered desired state (`controller.core.desired.render`), in node order."""
    out: dict[str, list[Endpoint]] = {}
    for name in sorted(desired.nodes):
        state = desired.nodes[name]
        node = spec.node(name)
        for c in state.containers:
            if c.config is None:
                continue
            # a swap pool's router serves each member under its alias, on the pool's one port
            served = [(m.model, m.alias) for m in c.config.members] if c.pool else [(c.model, c.config.alias)]
            for model, alias in served:
                out.setdefault(model, []).append(
                    Endpoint(
                        model=model,
                        node=name,
                        tier=node.tier,
                        runtime=Runtime.LLAMACPP,
                        url=f"http://{url_host(node.address)}:{c.config.port}/v1",
                        health_url=c.health_url,
                        served_model=alias,
                    )
                )
        if state.ollama is not None:
            base = state.ollama.url.rstrip("/")
            for m in state.ollama.models:
                out.setdefault(m.model, []).append(
                    Endpoint(
                        model=m.model,
                        node=name,
                        tier=node.tier,
                        runtime=Runtime.OLLAMA,
                        url=base,
                        health_url=f"{base}/api/tags",
                        served_model=m.name,
                    )
                )
    return {model: tuple(eps) for model, eps in out.items()}


# --------------------------------------------------------------------------- choice


@dataclass(frozen=True)
class EndpointHealth:
    """Whether an endpoint can take a request now, and if not, why ("connection refused", "loading")."""

    healthy: bool
    reason: str = ""


HealthView = Callable[[Endpoint], EndpointHealth | bool | None]
"""What `choose` asks about each candidate endpoint. None means unknown, and counts as healthy
(not known to be down): a health module answers for every endpoint it has probed."""

HealthInput = HealthView | Mapping[str, EndpointHealth | bool] | None
"""A `HealthView`; or a mapping keyed by health URL or by model name (missing keys are healthy);
or None: every endpoint is healthy (`homelab route --no-health`)."""


def _health_of(health: HealthInput, endpoint: Endpoint) -> EndpointHealth:
    if health is None:
        return EndpointHealth(True)
    if isinstance(health, Mapping):
        answer = health.get(endpoint.health_url, health.get(endpoint.model))
    else:
        answer = health(endpoint)
    if answer is None:
        return EndpointHealth(True)
    if isinstance(answer, bool):
        return EndpointHealth(answer, "" if answer else "unhealthy")
    return answer


@dataclass(frozen=True)
class Skipped:
    """A candidate that was passed over, and why."""

    category: Category
    model: str
    why: str

    def to_json(self) -> dict[str, str]:
        return {"category": self.category.value, "model": self.model, "why": self.why}


@dataclass(frozen=True)
class Route:
    """The endpoint that should serve a request, and why it was chosen."""

    requested: Category
    """The category the request was classified as."""
    category: Category
    """The category whose model serves it (the requested one, or a fallback)."""
    endpoint: Endpoint
    fallback_used: bool
    """True when the first choice of the requested category could not serve."""
    reason: str
    skipped: tuple[Skipped, ...] = ()
    classification: Classification | None = None

    @property
    def model(self) -> str:
        return self.endpoint.model

    @property
    def gateway_model(self) -> str:
        """The gateway's model group for the category that served: `expert/<category>`."""
        return GROUP_PREFIX + self.category.value

    def to_json(self) -> dict[str, object]:
        e = self.endpoint
        out: dict[str, object] = {
            "category": self.category.value,
            "requested_category": self.requested.value,
            "model": e.model,
            "node": e.node,
            "tier": e.tier.value,
            "runtime": e.runtime.value,
            "url": e.url,
            "served_model": e.served_model,
            "gateway_model": self.gateway_model,
            "gateway_model_direct": e.model,
            "fallback_used": self.fallback_used,
            "reason": self.reason,
            "skipped": [s.to_json() for s in self.skipped],
        }
        if self.classification is not None:
            out["signals"] = list(self.classification.signals)
            out["classification"] = self.classification.to_json()
        return out


def category_models(spec: ClusterSpec, category: Category) -> list[str]:
    """A category's preferred models, best first: its `routing.categories` entry, or else every
    model that lists the category, by priority (highest first) then name."""
    route = spec.routing.categories.get(category)
    if route is not None:
        return list(route.models)
    models = [m for m in spec.models if category in m.categories]
    return [m.name for m in sorted(models, key=lambda m: (-m.priority, m.name))]


def fallback_chain(spec: ClusterSpec, category: Category) -> list[Category]:
    """The category, then its fallback, that one's fallback … (a cycle stops at the first repeat)."""
    chain = [category]
    route = spec.routing.categories.get(category)
    while route is not None and route.fallback is not None and route.fallback not in chain:
        chain.append(route.fallback)
        route = spec.routing.categories.get(route.fallback)
    return chain


def candidates(spec: ClusterSpec, category: Category) -> list[tuple[Category, str]]:
    """Every (category, model) `choose` may try, in order; a model is tried once."""
    out: list[tuple[Category, str]] = []
    seen: set[str] = set()
    for cat in fallback_chain(spec, category):
        for model in category_models(spec, cat):
            if model not in seen:
                seen.add(model)
                out.append((cat, model))
    return out


def choose(
    spec: ClusterSpec,
    category: Category,
    endpoints: Mapping[str, Sequence[Endpoint]],
    health: HealthInput = None,
    classification: Classification | None = None,
) -> Route:
    """The first healthy endpoint of the category's preferred models, then of its fallback categories.

    `endpoints` is model → its placed replicas (`endpoints_from_state`); a model with none is unplaced.
    """
    known = {m.name for m in spec.models}
    skipped: list[Skipped] = []
    tried = candidates(spec, category)
    for cat, model in tried:
        if model not in known:
            raise RouteError(f"routing.categories.{cat.value}: unknown model '{model}'")
        replicas = endpoints.get(model, ())
        if not replicas:
            skipped.append(Skipped(cat, model, "not placed"))
            continue
        down: list[str] = []
        for endpoint in replicas:
            state = _health_of(health, endpoint)
            if state.healthy:
                return Route(
                    requested=category,
                    category=cat,
                    endpoint=endpoint,
                    fallback_used=bool(skipped) or bool(down),
                    reason=_reason(category, cat, endpoint, skipped, down),
                    skipped=tuple(skipped),
                    classification=classification,
                )
            down.append(f"on {endpoint.node}: {state.reason or 'unhealthy'}")
        skipped.append(Skipped(cat, model, "down (" + "; ".join(down) + ")"))
    if not tried:
        raise RouteError(
            f"no model serves '{category.value}': add it to routing.categories.{category.value}"
            f" or to a model's categories"
        )
    why = "; ".join(f"{s.model} is {s.why}" for s in skipped)
    chain = " → ".join(c.value for c in fallback_chain(spec, category))
    raise RouteError(f"no healthy model for '{category.value}' (tried {chain}): {why}")


def _reason(
    requested: Category, served: Category, endpoint: Endpoint, skipped: Sequence[Skipped], down: Sequence[str]
) -> str:
    where = f"{endpoint.model} on {endpoint.node}"
    if not skipped and not down:
        return f"{where}: first choice for {requested.value}"
    parts = [f"{s.model} is {s.why}" for s in skipped]
    if down:
        parts.append(f"{endpoint.model} is down " + "; ".join(down))
    if served is not requested:
        return "; ".join(parts) + f"; no {requested.value} model is up, falling back to {served.value}: using {where}"
    return "; ".join(parts) + f"; using {where}"


def route(
    spec: ClusterSpec,
    request: object,
    endpoints: Mapping[str, Sequence[Endpoint]],
    health: HealthInput = None,
    classifier: Classifier | None = None,
) -> Route:
    """Classify `request` with the spec's rules and choose its endpoint."""
    classification = (classifier or Classifier.from_spec(spec.routing)).classify(request)
    return choose(spec, classification.category, endpoints, health, classification)


def models_to_probe(spec: ClusterSpec, category: Category) -> list[str]:
    """The models whose health decides a route for `category`."""
    return [model for _, model in candidates(spec, category)]
