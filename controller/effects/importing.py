"""`homelab import`'s I/O: what each named node runs now, read through the Docker and Ollama drivers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from urllib.parse import urlparse

from pydantic import ValidationError

from controller.core.importer import DockerFacts, OllamaFacts
from controller.drivers.base import DockerNode, OllamaNode
from specs.model import ClusterSpec, Node


def endpoint_address(endpoint: str) -> str:
    """The node's address from its engine's endpoint: the host of tcp://, ssh://, http://; 127.0.0.1 for unix://."""
    if endpoint.startswith("unix://"):
        return "127.0.0.1"
    host = urlparse(endpoint).hostname
    return host or "127.0.0.1"


def probe_spec(cluster: str, docker: Sequence[tuple[str, str]], ollama: Sequence[tuple[str, str]]) -> ClusterSpec:
    """A throw-away spec naming the nodes to read, so the drivers can be opened the usual way."""
    nodes: dict[str, dict[str, object]] = {}
    for name, endpoint in docker:
        nodes[name] = {
            "name": name,
            "tier": "local",
            "address": endpoint_address(endpoint),
            "ram": 1,
            "docker": {"endpoint": endpoint},
            "llamacpp": {"image": "unused", "ports": "1-2"},
        }
    for name, url in ollama:
        entry = nodes.setdefault(name, {"name": name, "tier": "local", "address": endpoint_address(url), "ram": 1})
        entry["ollama"] = {"url": url}
    try:
        return ClusterSpec.model_validate({"cluster": {"name": cluster}, "nodes": list(nodes.values())})
    except ValidationError as exc:
        # one line per problem, naming the node and its field (never pydantic's own text, which ends in a URL)
        names = list(nodes)
        problems: list[str] = []
        for e in exc.errors(include_url=False):
            loc = list(e["loc"])
            if loc[:1] == ["nodes"] and len(loc) > 1 and isinstance(loc[1], int) and loc[1] < len(names):
                where = f"node {names[loc[1]]}: " + ".".join(str(p) for p in loc[2:])
            else:
                where = ".".join(str(p) for p in loc)
            problems.append(f"{where}: {e['msg']}")
        raise ValueError("; ".join(problems)) from None


def gather(
    spec: ClusterSpec,
    connect: Callable[[Node], DockerNode],
    ollama_connect: Callable[[Node], OllamaNode],
    docker_nodes: Sequence[str],
    ollama_nodes: Sequence[str],
) -> tuple[list[DockerFacts], list[OllamaFacts]]:
    """Every container of each Docker node, every model of each Ollama server. Raises DriverError."""
    dfacts: list[DockerFacts] = []
    for name in docker_nodes:
        node = spec.node(name)
        assert node.docker is not None
        engine = connect(node)
        engine.ping()
        dfacts.append(DockerFacts(name, node.address, node.docker.endpoint, engine.inspect_all()))
    ofacts: list[OllamaFacts] = []
    for name in ollama_nodes:
        node = spec.node(name)
        assert node.ollama is not None
        server = ollama_connect(node)
        tags = sorted(server.list_models())
        models = [(tag, state.num_ctx) for tag, state in zip(tags, server.derived_many(tags), strict=True)]
        ofacts.append(OllamaFacts(name, node.address, node.ollama.url, models))
    return dfacts, ofacts
