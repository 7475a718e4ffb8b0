"""What an existing, hand-built homelab runs → a spec (`homelab import`). Pure.

Input is what was observed: `docker inspect` dicts of every container of a node (labelled or not), the tags an
Ollama server has (with `/api/show`'s parameters), a LiteLLM `config.yaml` and a llama-swap `config.yaml` as
loaded YAML. Output is the text of a spec with a comment on every entry saying where it came from; what is
guessed (categories, fallbacks, a node's memory) says so.

llama-swap's format (its docs/configuration.md and config.example.yaml): `models: {ID: {cmd: "llama-server --port
${PORT} -m FILE …", proxy: URL, aliases: [NAME, …] or [{id, name}, …], macros: {…}, ttl: N}}`, `macros: {NAME:
value}` used as `${NAME}` in cmd and proxy, and which models run together: `groups: {NAME: {swap, exclusive,
members: [ID, …]}}` (older releases), the same under `routing.router.settings.groups`, or a `matrix` of `sets`
over `vars` (groups-and-matrix.md).

A model in a Docker volume of the local driver (mountpoint …/volumes/NAME/_data) is written with `source.volume`:
its managed container reads it there. One read through a bind mount is flagged (slow and fragile on Windows
Docker hosts) and copied into the node's model volume.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError

from controller.core.state import ADOPTED_SUFFIX, LABEL_CLUSTER, OLLAMA_PREFIX
from specs.enums import Category, KVCacheType
from specs.model import NAME_PATTERN, Model, gguf_file_name, volume_file
from specs.validate import owned_flag

DEFAULT_LLAMA_PORT = 8080
"""llama-server's port when none is given."""

_VALUE_FLAGS = frozenset(
    {
        "-m", "--model", "-c", "--ctx-size", "-ngl", "--n-gpu-layers", "--gpu-layers", "--port", "--host",
        "-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "-a", "--alias", "-np", "--parallel", "-t",
        "--threads", "-sm", "--split-mode", "-ts", "--tensor-split", "-mg", "--main-gpu", "-dev", "--device",
        "-mu", "--model-url", "-hf", "-hfr", "--hf-repo", "-hff", "--hf-file",
    }
)  # fmt: skip
"""Flags homelab owns that take a value (the next word, or `--flag=value`)."""

_FA_VALUES = frozenset({"on", "off", "auto"})


class ImportError_(ValueError):
    """An input file does not have the shape its program reads (one line, for the user)."""


class NotImported(ValueError):
    """One container, or one llama-swap model, that cannot become a model: skipped with a warning naming it."""


def unsafe_model_path(path: str) -> str | None:
    """Why a model path read from an imported config must not be copied (None when it may): one that climbs
    out of its directory (`/models/../../etc/shadow`) would have homelab copy whatever file it lands on."""
    if ".." in re.split(r"[\\/]", path):
        return f"its model path {path} climbs out of its directory (`..`); never copied"
    return None


# --------------------------------------------------------------------------- llama-server command lines


@dataclass(frozen=True)
class ServerArgs:
    """What a llama-server command line says."""

    model: str | None = None
    context: int | None = None
    gpu_layers: int | None = None
    port: int | None = None
    host: str | None = None
    cache_k: str | None = None
    cache_v: str | None = None
    alias: str | None = None
    flash_attn: bool | None = None
    parallel: int | None = None
    threads: int | None = None
    args: tuple[str, ...] = ()
    """Arguments homelab does not set itself: kept in the model's `args`."""
    dropped: tuple[str, ...] = ()
    """Flags homelab sets itself but the spec has no place for (threads, a tensor split): left out."""


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def parse_server_args(argv: Sequence[str]) -> ServerArgs:
    """Read llama-server's argv (with or without the program name)."""
    words = list(argv)
    if words and not words[0].startswith("-"):
        words = words[1:]  # the program (llama-server, /app/llama-server)
    values: dict[str, str] = {}
    kept: list[str] = []
    dropped: list[str] = []
    fa: bool | None = None
    i = 0
    while i < len(words):
        word = words[i]
        flag, eq, inline = word.partition("=")
        if flag in ("-fa", "--flash-attn"):
            if eq:
                fa = inline != "off"
            elif i + 1 < len(words) and words[i + 1] in _FA_VALUES:
                fa = words[i + 1] != "off"
                i += 1
            else:
                fa = True
            i += 1
            continue
        if flag == "--no-flash-attn":
            fa = False
            i += 1
            continue
        if flag in _VALUE_FLAGS:
            if eq:
                value = inline
            elif i + 1 < len(words):
                value = words[i + 1]
                i += 1
            else:
                value = ""
            values[flag] = value
            i += 1
            continue
        owned = owned_flag(word)
        if owned is not None:  # -c8192, -ngl99 …
            values[owned] = word[len(owned) :]
            i += 1
            continue
        kept.append(word)
        i += 1

    def get(*flags: str) -> str | None:
        for f in flags:
            if f in values:
                return values[f]
        return None

    for f in ("-t", "--threads", "-sm", "--split-mode", "-ts", "--tensor-split", "-mg", "--main-gpu", "-dev"):
        if f in values:
            dropped.append(f"{f} {values[f]}")
    ctx, ngl, port, np_, threads = (
        get(*f)
        for f in (
            ("-c", "--ctx-size"), ("-ngl", "--n-gpu-layers", "--gpu-layers"), ("--port",), ("-np", "--parallel"),
            ("-t", "--threads"),
        )
    )  # fmt: skip
    return ServerArgs(
        model=get("-m", "--model"),
        context=_int(ctx) if ctx is not None else None,
        gpu_layers=_int(ngl) if ngl is not None else None,
        port=_int(port) if port is not None else None,
        host=get("--host"),
        cache_k=get("-ctk", "--cache-type-k"),
        cache_v=get("-ctv", "--cache-type-v"),
        alias=get("-a", "--alias"),
        flash_attn=fa,
        parallel=_int(np_) if np_ is not None else None,
        threads=_int(threads) if threads is not None else None,
        args=tuple(kept),
        dropped=tuple(dropped),
    )


# --------------------------------------------------------------------------- names and guesses


def model_name(text: str) -> str:
    """A spec model name from an alias or a file: `Qwen2.5-14B-Instruct-Q4_K_M.gguf` → `qwen2.5-14b-instruct-q4_k_m`."""
    base = gguf_file_name(text)
    base = re.sub(r"\.gguf$", "", base, flags=re.IGNORECASE).lower()
    base = re.sub(r"[^a-z0-9._-]+", "-", base).strip("-._")
    base = base[:63].rstrip("-._")
    return base or "model"


_CATEGORY_HINTS: tuple[tuple[Category, tuple[str, ...]], ...] = (
    (Category.EMBED, ("embed", "bge", "minilm", "nomic", "e5-")),
    (Category.VISION, ("vision", "-vl", "llava", "vlm", "gemma3")),
    (Category.CODE, ("code", "coder", "starcoder", "devstral", "codestral")),
    (Category.REASON, ("reason", "r1", "qwq", "think", "deepseek")),
    (Category.FAST, ("0.5b", "1b", "1.5b", "3b", "mini", "tiny", "small")),
)


def guess_category(*names: str) -> Category:
    """A category from names (a model's, its alias, a llama-swap group's): a guess, marked as one."""
    text = " ".join(names).lower()
    for category, hints in _CATEGORY_HINTS:
        if any(h in text for h in hints):
            return category
    return Category.CHAT


# --------------------------------------------------------------------------- what was found


@dataclass
class Found:
    """One model found, with where it came from (comment lines) and its spec fields."""

    name: str
    fields: dict[str, Any]
    origin: list[str]
    guesses: list[str] = field(default_factory=list)
    category: Category = Category.CHAT
    served: set[str] = field(default_factory=set)
    """Names clients use for it (alias, llama-swap aliases, LiteLLM model names)."""
    port: int | None = None
    node: str = ""
    host: str | None = None
    """The address a hand-started llama-server listened on (`--host`)."""
    threads: int | None = None
    """Its `-t`."""
    held: str | None = None
    """Why it is written commented out (it cannot be a model of the spec as it is), else None."""


@dataclass(frozen=True)
class DockerFacts:
    node: str
    address: str
    endpoint: str
    containers: Sequence[Mapping[str, Any]]
    """`docker inspect` of every container on the node."""


@dataclass(frozen=True)
class OllamaFacts:
    node: str
    address: str
    url: str
    models: Sequence[tuple[str, int | None]]
    """(tag, its `num_ctx` parameter from `/api/show`) of every model on the server."""


def container_argv(inspect: Mapping[str, Any]) -> list[str]:
    path = inspect.get("Path")
    args = inspect.get("Args") or []
    out = [str(path)] if isinstance(path, str) and path else []
    return out + [str(a) for a in args if isinstance(a, (str, int))]


def _host_ports(inspect: Mapping[str, Any], container_port: int) -> list[int]:
    """The host ports a container's port is reachable on: itself with the host network, else its -p mappings."""
    host_config = inspect.get("HostConfig") or {}
    if host_config.get("NetworkMode") == "host":
        return [container_port]
    bindings = (host_config.get("PortBindings") or {}).get(f"{container_port}/tcp") or []
    ports = [_int(str(b.get("HostPort", ""))) for b in bindings if isinstance(b, Mapping)]
    return [p for p in ports if p]


def container_ports(inspect: Mapping[str, Any]) -> list[int]:
    """Every host port a container holds: its -p mappings, and llama-server's --port on the host network."""
    host_config = inspect.get("HostConfig") or {}
    ports: set[int] = set()
    for bindings in (host_config.get("PortBindings") or {}).values():
        for b in bindings or []:
            p = _int(str(b.get("HostPort", ""))) if isinstance(b, Mapping) else None
            if p:
                ports.add(p)
    if host_config.get("NetworkMode") == "host":
        parsed = parse_server_args(container_argv(inspect))
        if parsed.model is not None:
            ports.add(parsed.port or DEFAULT_LLAMA_PORT)
    return sorted(ports)


@dataclass(frozen=True)
class ModelMount:
    """Where a path inside a container comes from."""

    kind: str
    """volume or bind"""
    name: str
    """The volume's name; for a bind mount, the host directory."""
    host_path: str
    """The file's path on the host (a volume's: under its mountpoint)."""
    inner: str
    """The file's path inside the volume or bind mount."""


def model_mount(inspect: Mapping[str, Any], path: str) -> ModelMount | None:
    """The mount a path inside the container is read from (the longest matching destination)."""
    best: Mapping[str, Any] | None = None
    for m in inspect.get("Mounts") or []:
        dest = str(m.get("Destination", "")).rstrip("/")
        inside = path == dest or path.startswith(dest + "/")
        if inside and (best is None or len(dest) > len(str(best.get("Destination", "")).rstrip("/"))):
            best = m
    if best is None:
        return None
    dest = str(best.get("Destination", "")).rstrip("/")
    inner = path[len(dest) :].lstrip("/")
    source = str(best.get("Source", "")).rstrip("/")
    kind = str(best.get("Type", "bind"))
    name = str(best.get("Name") or source) if kind == "volume" else source
    return ModelMount(kind, name, f"{source}/{inner}", inner)


def llama_container(node: str, inspect: Mapping[str, Any]) -> Found | None:
    """A hand-started llama-server container as a spec model; None when it is not one (or is homelab's)."""
    labels = (inspect.get("Config") or {}).get("Labels") or {}
    if LABEL_CLUSTER in labels:
        return None
    parsed = parse_server_args(container_argv(inspect))
    if parsed.model is None:
        return None
    cname = str(inspect.get("Name", "")).lstrip("/")
    if cname.endswith(ADOPTED_SUFFIX):
        raise NotImported("homelab set it aside when a managed container adopted it")
    image = str((inspect.get("Config") or {}).get("Image", ""))
    status = str((inspect.get("State") or {}).get("Status", "unknown"))
    origin = [f"from container {cname} on {node} ({status}, image {image})"]
    guesses: list[str] = []
    if not parsed.model.startswith("/"):
        raise NotImported(f"its model path {parsed.model or '(none)'} is not an absolute path in the container")
    unsafe = unsafe_model_path(parsed.model)
    if unsafe is not None:
        raise NotImported(unsafe)
    mount = model_mount(inspect, parsed.model)
    if mount is not None and mount.kind == "bind" and re.fullmatch(r"[\\/]*|[A-Za-z]:[\\/]*", mount.name):
        raise NotImported(
            f"its model {parsed.model} is read through a bind mount of the host's root directory"
            f" {mount.name or '/'}; homelab copies model files only from a model directory, never from there"
        )
    if mount is None:
        origin.append(f"its model {parsed.model} is inside the image, not in a volume or bind mount: copy it out")
        source: dict[str, Any] = {"gguf": parsed.model, "node": node}
        guesses.append("source: the path is inside the container; point it at the file on the node")
    elif mount.kind == "volume" and volume_file(mount.host_path, mount.name) == mount.inner:
        origin.append(f"model {mount.inner} in Docker volume {mount.name}: read there, not copied")
        source = {"gguf": mount.host_path, "node": node, "volume": mount.name}
    elif mount.kind == "volume":
        origin.append(
            f"model {mount.inner} in Docker volume {mount.name}, whose mountpoint is not …/{mount.name}/_data"
            " (another volume driver): it is copied into the model volume"
        )
        source = {"gguf": mount.host_path, "node": node}
    else:
        origin.append(
            f"model read through a bind mount of {mount.name} (slow and fragile on Windows Docker hosts):"
            " it is copied into the model volume"
        )
        source = {"gguf": mount.host_path, "node": node}
    alias = parsed.alias
    name = model_name(alias) if alias and re.match(NAME_PATTERN, alias) else model_name(parsed.model)
    fields: dict[str, Any] = {"name": name, "runtime": "llamacpp", "adopt": cname, "source": source}
    inner_port = parsed.port or DEFAULT_LLAMA_PORT
    ports = _host_ports(inspect, inner_port)
    port = ports[0] if ports else None
    if port is not None:
        fields["port"] = port
    if parsed.context:
        fields["context"] = parsed.context
    kv = _kv_cache(parsed)
    if kv is not None:
        fields["kv_cache"] = kv
    if parsed.flash_attn is False and kv in (None, "f16"):
        fields["flash_attn"] = False
    if alias and alias != name:
        fields["alias"] = alias
    if parsed.parallel:
        fields["parallel"] = parsed.parallel
    if parsed.gpu_layers == 0:
        fields["placement"] = {"cpu_only": True}
    if parsed.args:
        fields["args"] = list(parsed.args)
    if parsed.gpu_layers:
        origin.append(f"ran with -ngl {parsed.gpu_layers}; homelab's placement decides the GPU layers")
    if parsed.dropped:
        origin.append("left out (homelab sets them from the placement): " + ", ".join(parsed.dropped))
    served = {name} | ({alias} if alias else set())
    found = Found(name, fields, origin, guesses, guess_category(name, alias or ""), served, port, node)
    found.host, found.threads = parsed.host, parsed.threads
    return found


def _check_model(m: Found) -> None:
    """Raise NotImported, with the spec's own message, when a found model's fields would not validate as a
    spec model (one odd container must not fail the whole import at a line of a file never written)."""
    try:
        Model.model_validate({**m.fields, "categories": [m.category.value]})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise NotImported(f"{where}: {first['msg']}" if where else str(first["msg"])) from None


def _kv_cache(parsed: ServerArgs) -> str | None:
    k, v = parsed.cache_k, parsed.cache_v
    if k is None and v is None:
        return None
    chosen = k or v
    allowed = {t.value for t in KVCacheType}
    if chosen in allowed and (k is None or v is None or k == v):
        return chosen
    return None


_ANY_HOST = {"0.0.0.0", "::", "[::]", ""}


def _node_address(facts: DockerFacts, hosts: set[str | None], notes: list[str], warnings: list[str]) -> str:
    """The node's address: the `--host` its hand-started servers agree on (a specific one, not 0.0.0.0), else the
    one its Docker endpoint gives — a guess for `unix://` (127.0.0.1), said so in the comment and as a warning
    unless every server listens on all addresses (then 127.0.0.1, this machine, reaches them)."""
    given = {h for h in hosts if h is not None}
    if len(hosts) == 1 and len(given) == 1 and not given <= _ANY_HOST:
        host = given.pop()
        notes.append("address: the --host of every container started by hand here")
        return host
    if not facts.endpoint.startswith("unix://") or (given and given <= _ANY_HOST and None not in hosts):
        return facts.address
    listen = f"; its containers started by hand listen on --host {', '.join(sorted(given))}" if given else ""
    notes.append(f"guessed: address {facts.address}, from the unix:// Docker endpoint{listen}")
    warnings.append(
        f"node {facts.node}: address {facts.address} is a guess from the unix:// Docker endpoint{listen}; set the"
        " address its model servers answer on before `homelab reconcile`"
    )
    return facts.address


def image_of(facts: DockerFacts) -> str | None:
    for c in facts.containers:
        labels = (c.get("Config") or {}).get("Labels") or {}
        if LABEL_CLUSTER not in labels and parse_server_args(container_argv(c)).model is not None:
            return str((c.get("Config") or {}).get("Image", "")) or None
    return None


def ollama_models(facts: OllamaFacts) -> list[Found]:
    found: list[Found] = []
    for tag, num_ctx in facts.models:
        if tag.startswith(OLLAMA_PREFIX):
            continue  # homelab's own derived models
        name = model_name(tag.replace(":latest", "").replace(":", "-").replace("/", "-"))
        fields: dict[str, Any] = {"name": name, "runtime": "ollama", "source": {"ollama": tag}}
        if num_ctx:
            fields["context"] = num_ctx
        found.append(
            Found(
                name,
                fields,
                [f"from Ollama on {facts.node}: tag {tag}"],
                [],
                guess_category(name),
                {tag, name},
                None,
                facts.node,
            )
        )
    return found


# --------------------------------------------------------------------------- llama-swap and LiteLLM


_MACRO_RE = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
_SET_WORD_RE = re.compile(r"\+?[^\s&|()]+")


MAX_EXPANDED = 64 * 1024
"""The longest text a llama-swap macro, `cmd` or `proxy` may expand to: a command line is a few hundred
characters; macros that use each other twice over double at every step (a 1 KB file would fill the memory)."""


def _expand(text: str, macros: Mapping[str, str], where: str) -> str:
    """llama-swap's `${name}` macros (a macro may use those defined before it); `${PORT}`, `${MODEL_ID}` given by
    the caller, `${env.X}` and unknown names left as they are. Raises ImportError_ (naming `where`) past
    MAX_EXPANDED characters, before building the longer text."""
    for _ in range(8):
        size = len(text)

        def one(m: re.Match[str]) -> str:
            nonlocal size
            value = macros.get(m[1], m[0])
            size += len(value) - len(m[0])
            if size > MAX_EXPANDED:
                raise ImportError_(
                    f"llama-swap config: {where}: its macros expand to more than {MAX_EXPANDED // 1024} KiB"
                )
            return value

        new = _MACRO_RE.sub(one, text)
        if new == text:
            break
        text = new
    return text


def _url_port(url: str, where: str) -> int | None:
    """The port of a URL (None without one), or ImportError_ naming `where` for a URL that has none to give
    (a port above 65535 or not a number, a broken IPv6 address)."""
    try:
        return urlparse(url).port
    except ValueError as exc:
        raise ImportError_(f"{where}: {url!r} is not a valid URL ({exc})") from None


def _macros(block: Any, inherited: Mapping[str, str], where: str) -> dict[str, str]:
    if block is None:
        return dict(inherited)
    if not isinstance(block, Mapping):
        raise ImportError_(f"llama-swap config: {where}: must be a mapping of macro names to values")
    out = dict(inherited)
    for k, v in block.items():
        value = ("true" if v else "false") if isinstance(v, bool) else str(v)
        out[str(k)] = _expand(value, out, f"{where}.{k}")
    return out


def _swap_groups(config: Mapping[str, Any]) -> dict[str, str]:
    """Model ID → the llama-swap group (or matrix set) it is in: top-level `groups` (older releases),
    `routing.router.settings.groups`, or a `matrix` (top-level or under routing) whose sets name models or `vars`."""
    routing = config.get("routing")
    router = routing.get("router") if isinstance(routing, Mapping) else None
    settings = router.get("settings") if isinstance(router, Mapping) else None
    settings = settings if isinstance(settings, Mapping) else {}
    group_of: dict[str, str] = {}
    for where, groups in (("groups", config.get("groups")), ("routing.router.settings.groups", settings.get("groups"))):
        if groups is None:
            continue
        if not isinstance(groups, Mapping):
            raise ImportError_(f"llama-swap config: `{where}` must be a mapping of group names to {{members: […]}}")
        for gname, group in groups.items():
            members = group.get("members") if isinstance(group, Mapping) else None
            for member in members if isinstance(members, list) else []:
                group_of.setdefault(str(member), str(gname))
    for where, matrix in (("matrix", config.get("matrix")), ("routing.router.settings.matrix", settings.get("matrix"))):
        if matrix is None:
            continue
        if not isinstance(matrix, Mapping) or not isinstance(matrix.get("sets") or {}, Mapping):
            raise ImportError_(f"llama-swap config: `{where}` must be a mapping with `vars` and `sets`")
        found_vars = matrix.get("vars")
        names: Mapping[str, Any] = found_vars if isinstance(found_vars, Mapping) else {}
        for sname, expr in (matrix.get("sets") or {}).items():
            for word in _SET_WORD_RE.findall(str(expr)):
                if not word.startswith("+"):  # +name inlines another set
                    group_of.setdefault(str(names.get(word, word)), str(sname))
    return group_of


def _alias_ids(aliases: Any) -> set[str]:
    """`aliases`: a list of names (older releases) or of `{id, name, unlisted}`."""
    out: set[str] = set()
    for a in aliases if isinstance(aliases, list) else []:
        if isinstance(a, Mapping) and a.get("id") is not None:
            out.add(str(a["id"]))
        elif isinstance(a, (str, int)):
            out.add(str(a))
    return out


_CONTAINER_RUNNERS = frozenset({"docker", "podman", "nerdctl"})


def llama_swap_models(config: Mapping[str, Any], node: str, notes: list[str] | None = None) -> list[Found]:
    """Models of a llama-swap config (each `cmd` a llama-server command line), to run on `node`.

    What is not imported (a container llama-swap starts, a server other than llama-server, a model path that is
    not absolute) is said in `notes`."""
    notes = notes if notes is not None else []
    models = config.get("models")
    if not isinstance(models, Mapping):
        raise ImportError_("llama-swap config: `models` must be a mapping of model IDs to {cmd: …}")
    group_of = _swap_groups(config)
    global_macros = _macros(config.get("macros"), {}, "macros")
    found: list[Found] = []
    for mid, entry in models.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("cmd"), str):
            raise ImportError_(f"llama-swap config: models.{mid}: needs `cmd`, the server's command line")
        macros = _macros(entry.get("macros"), {**global_macros, "MODEL_ID": str(mid)}, f"models.{mid}.macros")
        cmd = re.sub(r"\\\n", " ", entry["cmd"])
        cmd = "\n".join(line.split("#", 1)[0] if line.lstrip().startswith("#") else line for line in cmd.splitlines())
        cmd = _expand(cmd, macros, f"models.{mid}.cmd")
        try:
            argv = shlex.split(cmd, comments=True)
        except ValueError as exc:
            raise ImportError_(f"llama-swap config: models.{mid}.cmd: cannot be split into words: {exc}") from None
        if argv and argv[0].rsplit("/", 1)[-1] in _CONTAINER_RUNNERS:
            notes.append(f"llama-swap model {mid}: a container it starts; import it with --from-docker while it runs")
            continue
        parsed = parse_server_args(argv)
        if parsed.model is None:
            notes.append(f"llama-swap model {mid}: not a llama-server with -m FILE; not homelab's to run")
            continue
        if not parsed.model.startswith("/"):
            notes.append(f"llama-swap model {mid}: its model path {parsed.model} is not absolute; add it by hand")
            continue
        unsafe = unsafe_model_path(parsed.model)
        if unsafe is not None:
            notes.append(f"llama-swap model {mid}: {unsafe}")
            continue
        name = model_name(str(mid))
        fields: dict[str, Any] = {"name": name, "runtime": "llamacpp", "source": {"gguf": parsed.model, "node": node}}
        port = None
        proxy = entry.get("proxy")
        if isinstance(proxy, str):
            proxy = _expand(proxy, macros, f"models.{mid}.proxy")
            if "${" not in proxy:
                port = _url_port(proxy, f"llama-swap config: models.{mid}.proxy")
        if port is not None:
            fields["port"] = port
        if parsed.context:
            fields["context"] = parsed.context
        kv = _kv_cache(parsed)
        if kv is not None:
            fields["kv_cache"] = kv
        if parsed.alias and parsed.alias != name:
            fields["alias"] = parsed.alias
        if parsed.gpu_layers == 0:
            fields["placement"] = {"cpu_only": True}
        if parsed.args:
            fields["args"] = list(parsed.args)
        origin = [f"from llama-swap model {mid}" + (f" (group {group_of[str(mid)]})" if str(mid) in group_of else "")]
        guesses = [f"runs on node {node}: llama-swap ran it on demand on its own machine"]
        aliases = _alias_ids(entry.get("aliases"))
        cat = guess_category(name, group_of.get(str(mid), ""), *sorted(aliases))
        found.append(Found(name, fields, origin, guesses, cat, {str(mid), name, *aliases}, port, node))
    return found


def litellm_routes(config: Mapping[str, Any]) -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """(LiteLLM model name → the upstream names and ports it points at, fallbacks as (from, to) model names)."""
    entries = config.get("model_list")
    if not isinstance(entries, list):
        raise ImportError_("LiteLLM config: `model_list` must be a list of {model_name, litellm_params}")
    routes: dict[str, set[str]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model_name"), str):
            raise ImportError_(f"LiteLLM config: model_list[{i}]: needs `model_name`")
        params = entry.get("litellm_params") or {}
        keys: set[str] = set()
        if isinstance(params, Mapping):
            upstream = str(params.get("model", ""))
            keys.add(upstream.split("/", 1)[-1])
            base = params.get("api_base")
            if isinstance(base, str):
                port = _url_port(base, f"LiteLLM config: model_list[{i}].litellm_params.api_base")
                if port is not None:
                    keys.add(f":{port}")
        routes.setdefault(entry["model_name"], set()).update(keys)
    fallbacks: list[tuple[str, str]] = []
    for section in ("router_settings", "litellm_settings"):
        block = config.get(section) or {}
        items = (block.get("fallbacks") or []) if isinstance(block, Mapping) else []
        if not isinstance(items, list):
            raise ImportError_(f"LiteLLM config: {section}.fallbacks: must be a list of {{model: [fallbacks]}}")
        for item in items:
            if isinstance(item, Mapping):
                for src, targets in item.items():
                    for t in targets if isinstance(targets, list) else [targets]:
                        fallbacks.append((str(src), str(t)))
    return routes, fallbacks


# --------------------------------------------------------------------------- the spec


_YAML_WORDS = frozenset({"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"})


def _q(value: Any) -> str:
    """A YAML scalar (JSON is YAML): strings quoted only when they would not read back as themselves."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    plain = re.fullmatch(r"[A-Za-z_/][A-Za-z0-9_./+-]*", text) is not None
    if plain and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)


_UNSAFE_IN_COMMENT = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]")
"""What may not go into a `#` comment as it is: control characters (a newline or carriage return would end the
comment and start YAML of the imported config's choosing), Unicode line and paragraph separators (a line break
to some YAML readers) and the invisible format characters (bidi overrides) that make a line read as another."""


def _comment(before: str, text: str) -> str:
    """One comment line: `before` (indent, or a value and spaces) then `# text`, with every character of `text`
    that could end the line or disguise it written as an escape (`\\x0a`, `\\u2028`): whatever an imported
    config names, it stays inside the comment."""
    safe = _UNSAFE_IN_COMMENT.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)
    return f"{before}# {safe}"


def _emit(lines: list[str], indent: str, key: str, value: Any) -> None:
    if isinstance(value, Mapping):
        lines.append(f"{indent}{key}:")
        for k, v in value.items():
            _emit(lines, indent + "  ", str(k), v)
    elif isinstance(value, list):
        lines.append(f"{indent}{key}: [{', '.join(_q(v) for v in value)}]")
    else:
        lines.append(f"{indent}{key}: {_q(value)}")


def _source_key(src: Mapping[str, Any]) -> str:
    """What makes two found models one: the same Ollama tag, or the same file on the same node (its whole path:
    `q4/model.gguf` and `q8/model.gguf` are two models)."""
    if "ollama" in src:
        return f"ollama:{src['ollama']}"
    path = str(src["gguf"]).replace("\\", "/")
    return f"gguf:{src.get('node', '')}:{posixpath.normpath(path)}"


def _from_llama_swap(m: Found) -> bool:
    return bool(m.origin) and m.origin[0].startswith("from llama-swap model ")


def _dedupe(models: list[Found]) -> list[Found]:
    """One model per file or tag (no model served twice), names made unique."""
    seen: dict[str, Found] = {}
    names: set[str] = set()
    out: list[Found] = []
    same_base: dict[tuple[str, str], set[str]] = {}
    for m in models:
        src = m.fields["source"]
        if "gguf" in src:
            same_base.setdefault((src.get("node", ""), gguf_file_name(src["gguf"])), set()).add(_source_key(src))
    # A llama-swap model names its file as llama-swap's host sees it; a container's file is named by where Docker
    # keeps it (a volume's directory, a bind mount's source). A llama-swap model whose file has the base name of
    # exactly one container's file is that file (llama-swap starting the server the container runs): one model.
    from_containers: dict[tuple[str, str], set[str]] = {}
    for m in models:
        src = m.fields["source"]
        if "gguf" in src and not _from_llama_swap(m):
            base_key = (src.get("node", ""), gguf_file_name(src["gguf"]))
            from_containers.setdefault(base_key, set()).add(_source_key(src))
    redirect: dict[int, str] = {}
    for m in models:
        src = m.fields["source"]
        if "gguf" in src and _from_llama_swap(m):
            base_key = (src.get("node", ""), gguf_file_name(src["gguf"]))
            matches = from_containers.get(base_key, set())
            if len(matches) == 1 and _source_key(src) not in matches:
                redirect[id(m)] = next(iter(matches))
                same_base[base_key].discard(_source_key(src))
    for m in sorted(models, key=_from_llama_swap):  # a container's model first: its file is the one Docker holds
        src = m.fields["source"]
        key = redirect.get(id(m), _source_key(src))
        if "gguf" in src and "alias" not in m.fields:
            base = gguf_file_name(src["gguf"])
            others = same_base[src.get("node", ""), base] - {key}
            if others and m.name == model_name(src["gguf"]):
                # Named after a file name another file on the node shares: its directory tells them apart.
                parent = gguf_file_name(posixpath.dirname(str(src["gguf"]).replace("\\", "/")) or "")
                m.name = model_name(f"{parent}-{base}") if parent else m.name
        kept = seen.get(key)
        if kept is not None:
            # The same file seen again (a llama-swap model of a running container's file): one model, which
            # clients also know by the other's names, in the other's group.
            kept.served |= m.served
            kept.origin.append("also " + m.origin[0].removeprefix("from "))
            if kept.category is Category.CHAT and m.category is not Category.CHAT:
                kept.category = m.category
            continue
        seen[key] = m
        name, n = m.name, 2
        while name in names:
            name = f"{m.name[:60]}-{n}"
            n += 1
        names.add(name)
        m.name = name
        m.fields["name"] = name
        out.append(m)
    order = {id(m): i for i, m in enumerate(models)}
    out.sort(key=lambda m: order[id(m)])  # as found, whichever was processed first
    # A node's model volume holds one file of a name (`specs.validate`): of different files that share a base
    # name on one node, the first is a model, the others are written commented out, to rename and uncomment.
    first_of: dict[tuple[str, str], Found] = {}
    for m in out:
        src = m.fields["source"]
        if "gguf" not in src:
            continue
        base = gguf_file_name(src["gguf"])
        first = first_of.setdefault((src.get("node", ""), base), m)
        if first is not m:
            m.held = (
                f"not a model yet: its file {src['gguf']} has the name {base} of {first.name}'s"
                f" ({first.fields['source']['gguf']}), and a node's model volume holds one file of a name;"
                " rename one of the files, then uncomment this model"
            )
    return out


def build_spec(
    cluster: str,
    docker: Sequence[DockerFacts] = (),
    ollama: Sequence[OllamaFacts] = (),
    litellm: Mapping[str, Any] | None = None,
    llama_swap: Mapping[str, Any] | None = None,
    sources: Mapping[str, str] | None = None,
    skipped: list[str] | None = None,
    warnings: list[str] | None = None,
) -> str:
    """The spec text. `sources` names the input files in comments (`litellm`, `llama-swap` → path); `skipped`,
    when given, gets what was not imported and why (also written as `# not imported:` comments)."""
    sources = sources or {}
    warnings = warnings if warnings is not None else []
    found: list[Found] = []
    skipped = skipped if skipped is not None else []
    for facts in docker:
        for c in sorted(facts.containers, key=lambda c: str(c.get("Name", ""))):
            try:
                m = llama_container(facts.node, c)
                if m is not None:
                    _check_model(m)
                    found.append(m)
            except NotImported as exc:
                skipped.append(f"container {str(c.get('Name', '?')).lstrip('/')} on {facts.node}: {exc}")
    if llama_swap is not None:
        if not docker:
            raise ImportError_("--llama-swap needs a --from-docker node to run its models on")
        for m in llama_swap_models(llama_swap, docker[0].node, skipped):
            try:
                _check_model(m)
                found.append(m)
            except NotImported as exc:
                skipped.append(f"{m.origin[0].removeprefix('from ')}: {exc}")
    for ofacts in ollama:
        found.extend(ollama_models(ofacts))
    found = _dedupe(found)
    held = [m for m in found if m.held is not None]
    found = [m for m in found if m.held is None]
    skipped.extend(f"{m.name} ({m.origin[0].removeprefix('from ')}): {m.held}" for m in held)
    # LiteLLM: names clients use, and fallbacks between them.
    fallbacks: list[tuple[str, str]] = []
    if litellm is not None:
        routes, fb = litellm_routes(litellm)
        for public, keys in routes.items():
            for m in found:
                port_key = f":{m.port}" if m.port is not None else None
                if keys & m.served or (port_key is not None and port_key in keys):
                    m.served.add(public)
                    m.origin.append(f"LiteLLM serves it as {public} ({sources.get('litellm', 'LiteLLM config')})")
                    m.category = guess_category(m.name, public)
        fallbacks = fb

    def by_served(name: str) -> Found | None:
        return next((m for m in found if name in m.served), None)

    nodes: dict[str, dict[str, Any]] = {}
    node_notes: dict[str, list[str]] = {}
    ports_of: dict[str, list[int]] = {}
    for m in found:
        if m.port is not None:
            ports_of.setdefault(m.node, []).append(m.port)
    for facts in docker:
        image = image_of(facts) or "ghcr.io/ggml-org/llama.cpp:server-cuda"
        ports = ports_of.get(facts.node, [])
        lo, hi = (min(ports), max(ports)) if ports else (8080, 8099)
        if hi - lo < 19:
            hi = min(65535, lo + 19)
        llamacpp: dict[str, Any] = {"image": image, "ports": f"{lo}-{hi}"}
        notes = [
            f"from Docker at {facts.endpoint}",
            "guessed: tier, ram and gpus; run `homelab discover --write` to fill in what the node has",
        ]
        # What every container started by hand on the node agrees on: the address it listened on, its threads.
        adopted = [m for m in found if m.node == facts.node and "adopt" in m.fields]
        for key, values, flag in (
            ("bind_address", {m.host for m in adopted}, "--host"),
            ("threads", {m.threads for m in adopted}, "-t"),
        ):
            if len(values) == 1 and None not in values:
                llamacpp[key] = values.pop()
                notes.append(f"llamacpp.{key}: the {flag} of every container started by hand here")
        address = _node_address(facts, {m.host for m in adopted}, notes, warnings)
        nodes[facts.node] = {
            "name": facts.node,
            "tier": "local",
            "address": address,
            "ram": "16GiB",
            "docker": {"endpoint": facts.endpoint},
            "llamacpp": llamacpp,
        }
        node_notes[facts.node] = notes
    for ofacts in ollama:
        entry = nodes.get(ofacts.node)
        if entry is None:
            nodes[ofacts.node] = {"name": ofacts.node, "tier": "local", "address": ofacts.address, "ram": "16GiB"}
            node_notes[ofacts.node] = [
                "guessed: tier, ram and gpus; run `homelab discover --write` to fill in what the node has"
            ]
            entry = nodes[ofacts.node]
        entry["ollama"] = {"url": ofacts.url}
        node_notes[ofacts.node].append(f"Ollama at {ofacts.url}")
    if not nodes:
        raise ImportError_("nothing to import: give --from-docker or --from-ollama")

    lines = [
        "# Written by `homelab import` from what the cluster runs now.",
        "# Entries marked `guessed` were not observed: check them before `homelab reconcile`.",
        *(_comment("", f"not imported: {note}") for note in skipped),
        "version: 1",
        "cluster:",
        f"  name: {_q(cluster)}",
        "nodes:",
    ]
    for name, entry in nodes.items():
        for note in node_notes[name]:
            lines.append(_comment("  ", note))
        items = list(entry.items())
        k0, v0 = items[0]
        lines.append(f"  - {k0}: {_q(v0)}")
        for k, v in items[1:]:
            _emit(lines, "    ", k, v)
    lines.append("models:" if found else "models: []")
    for m in found:
        for note in m.origin:
            lines.append(_comment("  ", note))
        for note in m.guesses:
            lines.append(_comment("  ", f"guessed: {note}"))
        items = list(m.fields.items())
        lines.append(f"  - name: {_q(m.name)}")
        for k, v in items[1:]:
            _emit(lines, "    ", k, v)
        lines.append(f"    categories: [{m.category.value}]  # guessed from its names")
    for m in held:
        block = [_comment("  ", note) for note in (*m.origin, f"{m.held}:")]
        body = [f"  - name: {_q(m.name)}"]
        for k, v in list(m.fields.items())[1:]:
            _emit(body, "    ", k, v)
        body.append(f"    categories: [{m.category.value}]")
        lines.extend(block + [f"  # {line[2:]}" for line in body])
    # Routing: each category's models; a LiteLLM fallback to a model of another category becomes its fallback.
    cats: dict[Category, list[str]] = {}
    for m in found:
        cats.setdefault(m.category, []).append(m.name)
    fb_of: dict[Category, tuple[Category, str, str]] = {}
    for src, dst in fallbacks:
        a, b = by_served(src), by_served(dst)
        if a is not None and b is not None and a.category != b.category and a.category not in fb_of:
            fb_of[a.category] = (b.category, src, dst)
    if cats:
        lines.append("routing:")
        lines.append("  categories:")
        for cat in sorted(cats, key=lambda c: list(Category).index(c)):
            lines.append(f"    {cat.value}:")
            lines.append(f"      models: [{', '.join(_q(n) for n in cats[cat])}]")
            if cat in fb_of:
                to, src, dst = fb_of[cat]
                lines.append(
                    _comment(f"      fallback: {to.value}  ", f"guessed from LiteLLM's fallback {src} → {dst}")
                )
    return "\n".join(lines) + "\n"
