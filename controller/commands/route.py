"""`homelab route`: which model should serve this request, and why.

    homelab route [-f FILE] [--json] [--no-health] (PROMPT | --request FILE|-)

Classifies the request with the spec's routing rules, works out what runs where the way
`homelab reconcile` does (`Session.resolve`: observed, placed, rendered: ports, Ollama
models) to know each model's endpoint, probes only the candidates' endpoints (unless
`--no-health`: every endpoint is taken as healthy) and prints the chosen one.
Exit 0 with a route, 1 on an error (one line on stderr; with `--json`, `{"error": "..."}` on stdout).

`controller/cli.py` calls `register(app)`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from controller.commands.common import SpecFileOption, fail, load_or_exit, out, spec_path, wiring_of
from controller.core.routing import (
    Classifier,
    Endpoint,
    EndpointHealth,
    HealthInput,
    HealthView,
    RequestError,
    Route,
    _health_of,
    candidates,
    choose,
    endpoints_from_state,
    parse_json,
)
from controller.effects.engine import Session, Wiring, state_dir
from controller.effects.power import asleep_nodes
from controller.effects.route_probe import HealthCache, embedding_stage_for, probe
from specs.enums import Category
from specs.errors import HomelabError
from specs.model import ClusterSpec

CACHE_FILE = "route-health.json"


def endpoints_for(spec: ClusterSpec, wiring: Wiring, *, observe: bool = True) -> dict[str, tuple[Endpoint, ...]]:
    """model → endpoints of its placed replicas, where `reconcile` puts them (`Session.resolve`): the replicas
    seen running stay and keep their ports. `observe=False` touches no network: ports as a reconcile from
    scratch would give them. Raises HomelabError (RenderError, GatewayError …)."""
    with Session(spec, wiring) as session:
        desired = session.resolve(observe=observe, gpus=observe).desired()
    return endpoints_from_state(spec, desired)


def _with_power(spec: ClusterSpec, asleep: set[str], health: HealthInput) -> HealthView:
    """Health as the gateway sees it: a replica on a node homelab put to sleep serves (`on_request: wait`: the
    gateway wakes the node and holds the request) or not (`fallback`: the fallback answers while it wakes)."""

    def view(e: Endpoint) -> EndpointHealth:
        node = spec.node(e.node)
        if e.node in asleep and node.power is not None:
            if node.power.on_request == "wait":
                return EndpointHealth(True, "asleep: waking")
            return EndpointHealth(False, "asleep: using fallback")
        return _health_of(health, e)

    return view


def _power_lines(
    spec: ClusterSpec, asleep: set[str], chosen: Route, endpoints: Mapping[str, Sequence[Endpoint]]
) -> list[str]:
    """`asleep: waking` / `asleep: using fallback` for the sleeping nodes the route passes."""
    lines: list[str] = []
    for cat, model in candidates(spec, chosen.requested):
        for e in endpoints.get(model, ()):
            node = spec.node(e.node)
            if e.node in asleep and node.power is not None:
                if node.power.on_request == "wait":
                    lines.append(
                        f"{model} on {e.node} asleep: waking (the gateway wakes the node and holds the request"
                        f" up to {node.power.wake_timeout:g} s)"
                    )
                else:
                    lines.append(f"{model} on {e.node} asleep: using fallback (the gateway wakes the node meanwhile)")
        if model == chosen.model and cat == chosen.category:
            break
    return lines


def _read_request(prompt: str | None, request_file: str | None) -> object:
    """The request to route: the prompt, or the JSON body in the file (or stdin). Raises RequestError."""
    if prompt is not None and request_file is not None:
        raise RequestError("give a prompt or --request, not both")
    if request_file is None:
        if prompt is None:
            raise RequestError("give a prompt, or --request FILE (- for stdin) with a JSON request body")
        return prompt
    if request_file == "-":
        text = sys.stdin.read()
        where = "stdin"
    else:
        try:
            text = Path(request_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RequestError(f"{request_file}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
        where = request_file
    if not text.strip():
        raise RequestError(f"{where}: empty request")
    try:
        return parse_json(text)
    except RequestError as exc:
        raise RequestError(f"{where}: {exc}") from None


def _print(route: Route) -> None:
    e = route.endpoint
    requested = "" if route.category is route.requested else f" (asked: {route.requested.value})"
    out.print(f"{route.category.value}{requested} → {e.model} on {e.node} ({e.tier.value})", markup=False)
    out.print(f"  url:      {e.url}  (model: {e.served_model})", markup=False)
    out.print(f"  gateway:  {route.gateway_model}  (or {e.model})", markup=False)
    if route.classification is not None:
        c = route.classification
        out.print(f"  signals:  {', '.join(c.signals)}", markup=False)
        out.print(f"  stage:    {c.stage}{'' if c.confident else ' (rules unsure)'}", markup=False)
        if c.note:
            out.print(f"  embedding: {c.note}", markup=False)
    out.print(f"  reason:   {route.reason}", markup=False)


def register(app: typer.Typer) -> None:
    """Add the `route` command to `app`."""

    def route_cmd(
        ctx: typer.Context,
        prompt: Annotated[str | None, typer.Argument(help="The prompt to route.", show_default=False)] = None,
        file: SpecFileOption = None,
        request: Annotated[
            str | None,
            typer.Option(
                "--request",
                help="A JSON request body (chat completions, completions, embeddings) in FILE, or - for stdin.",
                show_default=False,
            ),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the route as JSON.")] = False,
        no_health: Annotated[
            bool,
            typer.Option(
                "--no-health",
                help="No network at all: every endpoint taken as healthy, ports as a fresh reconcile would give.",
            ),
        ] = False,
    ) -> None:
        """Classify a request and choose the healthy model that should serve it."""
        try:
            body = _read_request(prompt, request)
        except RequestError as exc:
            fail(str(exc), as_json=as_json)
        spec = load_or_exit(spec_path(file), as_json=as_json).spec
        try:
            chosen, power = _route(ctx, spec, body, no_health)
        except (RequestError, HomelabError) as exc:
            fail(str(exc), as_json=as_json)
        if as_json:
            data = chosen.to_json()
            if power:
                data["power"] = power
            out.print(json.dumps(data, indent=2, ensure_ascii=False), markup=False)
        else:
            _print(chosen)
            for line in power:
                out.print(f"  power:    {line}", markup=False)

    app.command(name="route")(route_cmd)


def _route(ctx: typer.Context, spec: ClusterSpec, body: object, no_health: bool) -> tuple[Route, list[str]]:
    """The route for `body` and its power lines. Raises RequestError, HomelabError (RouteError, RenderError …)."""
    classification = Classifier.from_spec(spec.routing).classify(body)
    # With health checks, the cluster is observed and placed as `reconcile` places it (replicas keep their
    # nodes and ports); --no-health touches no network: ports as a reconcile from scratch would give them.
    endpoints = endpoints_for(spec, wiring_of(ctx), observe=not no_health)
    health = None
    if not no_health:
        cache = HealthCache(state_dir(spec, None) / CACHE_FILE, ttl=spec.health.interval)
        if not classification.confident:  # the rules are unsure: ask the nearest labelled examples
            embedders = [e for _, m in candidates(spec, Category.EMBED) for e in endpoints.get(m, ())]
            if spec.routing.embedding_model is not None:
                embedders += endpoints.get(spec.routing.embedding_model, ())
            embed_health = probe(spec, embedders, cache).get
            stage, why = embedding_stage_for(spec, endpoints, embed_health, state_dir(spec, None))
            if stage is not None:
                classification = Classifier.from_spec(spec.routing, stage).classify(body)
            else:
                classification = replace(classification, note=why)
        wanted = [e for _, model in candidates(spec, classification.category) for e in endpoints.get(model, ())]
        found = probe(spec, wanted, cache)
        health = found.get
    asleep = set() if no_health else asleep_nodes(spec, state_dir(spec, None))
    seen: HealthInput = _with_power(spec, asleep, health) if asleep else health
    chosen = choose(spec, classification.category, endpoints, seen, classification)
    return chosen, _power_lines(spec, asleep, chosen, endpoints)
