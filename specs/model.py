"""The desired-state language: one frozen pydantic model per section of cluster.yaml.

Structure and types are checked here; references between sections (a model
pinned to a node that does not exist, a routing list naming an unknown model,
duplicate names …) are checked in `specs.validate`, which reports them with
their location in the file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, ClassVar, Literal, Self, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from specs.enums import (
    Category,
    GpuAccess,
    KVCacheType,
    LayerOrder,
    OsFamily,
    Residency,
    Runtime,
    Tier,
)
from specs.units import format_size, parse_duration, parse_size

# --------------------------------------------------------------------------- types

Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {
                    "type": "string",
                    "pattern": r"^\s*(\d+(\.\d+)?|\.\d+)\s*([kKmMgGtT]([iI]?[bB]?)?|[bB])?\s*$",
                },
            ],
            "description": "bytes, or a size such as 24GiB, 9.0 GB, 512MiB",
        }
    ),
]
"""A number of bytes; written as an integer or as `24GiB`, `9.0 GB`, `512MiB`."""

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\s*((\d+(\.\d+)?(ms|s|m|h|d))+|\d+(\.\d+)?)\s*$"},
            ],
            "description": "seconds, or a duration such as 30s, 2m, 1h30m, 250ms",
        }
    ),
]
"""A number of seconds; written as a number or as `30s`, `2m`, `1h30m`."""

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
HTTP_URL_PATTERN = r"^https?://.+"
DOCKER_ENDPOINT_PATTERN = r"^(unix|tcp|ssh)://.+"
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
FILE_EXTENSION_PATTERN = r"^\.[A-Za-z0-9_+-]+$"

PATTERN_MESSAGES = {
    NAME_PATTERN: "must be a name made of letters, digits, '.', '_' and '-', starting with a letter or digit",
    HTTP_URL_PATTERN: "must be a URL starting with http:// or https://",
    DOCKER_ENDPOINT_PATTERN: "must start with unix://, tcp:// or ssh://",
    SHA256_PATTERN: "must be a SHA-256 checksum: 64 hexadecimal digits",
    FILE_EXTENSION_PATTERN: "must be a file extension such as .py",
}
"""How a pattern mismatch is explained to the user."""
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
"""A name that can be part of a container name: letters, digits, `.`, `_`, `-`."""

MAX_INT = 2**31 - 1
"""No count in a spec is larger (llama.cpp and Docker take 32-bit numbers); a larger one is a mistake
that would overflow later (OR-Tools, float conversions)."""
MAX_LAYERS = 512
"""llama.cpp's LLAMA_MAX_LAYERS: no model it can load has more blocks (the GGUF reader uses it too)."""
MAX_CONTEXT = 1 << 24
"""16M tokens: above any model's trained context (10M is the largest published)."""
DEFAULT_TTL_S = 600.0
"""An on-demand model's idle time before it is unloaded when the spec gives no `ttl`."""

PositiveInt = Annotated[int, Strict(), Field(gt=0, le=MAX_INT)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0, le=MAX_INT)]
Port = Annotated[int, Strict(), Field(ge=1, le=65535)]

SECRET_PROVIDERS = ("env:", "file:", "cmd:")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")


def _check_provider_ref(value: str) -> str:
    """A secret provider reference: `env:NAME`, `file:/abs/path` or `cmd:COMMAND`.

    Error messages never repeat the value: a literal secret in the wrong place
    must not be echoed to a terminal or a CI log.
    """
    if value.startswith("env:"):
        if not _ENV_NAME_RE.match(value[4:]):
            raise ValueError("env: reference needs an environment variable name (env:NAME)")
        return value
    if value.startswith("file:"):
        path = value[5:]
        if not (path.startswith("/") or path.startswith("~")):
            raise ValueError("file: reference needs an absolute path (file:/path/to/secret)")
        return value
    if value.startswith("cmd:"):
        if not value[4:].strip():
            raise ValueError("cmd: reference needs a command (cmd:vault kv get ...)")
        return value
    raise ValueError(
        "must be a secret reference (env:NAME, file:/path or cmd:COMMAND);"
        " literal secret values are not allowed in the spec"
    )


def _check_secret_ref(value: str) -> str:
    """Where a secret is used: `secret:NAME` (an entry of `secrets:`) or a provider reference."""
    if value.startswith("secret:"):
        if not re.match(NAME_PATTERN, value[7:]):
            raise ValueError("secret: reference needs the name of an entry in `secrets` (secret:NAME)")
        return value
    try:
        return _check_provider_ref(value)
    except ValueError:
        raise ValueError(
            "must be a secret reference (secret:NAME, env:NAME, file:/path or cmd:COMMAND);"
            " literal secret values are not allowed in the spec"
        ) from None


ProviderRef = Annotated[
    str,
    AfterValidator(_check_provider_ref),
    Field(
        description="where the secret comes from: env:NAME, file:/path or cmd:COMMAND",
        json_schema_extra={"pattern": r"^(env|file|cmd):.+"},
    ),
]
SecretRef = Annotated[
    str,
    AfterValidator(_check_secret_ref),
    Field(
        description="secret:NAME (an entry of `secrets`), or env:NAME, file:/path, cmd:COMMAND",
        json_schema_extra={"pattern": r"^(secret|env|file|cmd):.+"},
    ),
]


_OTHER_CONTROL = "\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
"""Control characters but NUL … BS, TAB and LF, plus the Unicode line separators and bidi overrides."""
_NO_CONTROL_RE = re.compile("[\x00-\x0a" + _OTHER_CONTROL + "]")
_MULTILINE_CONTROL_RE = re.compile("[\x00-\x08" + _OTHER_CONTROL + "]")
"""Commands may be written over several lines (a YAML `|` or `>` block) and hold tabs."""


def _strings(key: str, value: object, *, mapping: bool) -> Iterator[tuple[str, str]]:
    """The strings of one field's raw value (`key`, `key[i]`), with the label to report them by;
    with `mapping`, the keys and values of a dict field too (a section is checked by its own model)."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, str):
                yield f"{key}[{i}]", item
    elif mapping and isinstance(value, Mapping):
        for k, v in value.items():
            for item in (k, v):
                if isinstance(item, str):
                    yield key, item


@dataclass(frozen=True)
class Effect:
    """What a spec key makes homelab do besides reading it. Every key that runs a command or chooses a file
    homelab writes is marked with one (in its section's `EFFECTS`): `homelab watch --git`'s guard
    (`specs.validate.command_keys`) and the README's list are derived from these marks, and a test fails when a
    key that looks like one (a name with command, cmd, path, file, script or exec; a secret reference; a list or
    mapping of strings) is not marked."""

    kind: Literal["command", "file", "secret", "harmless"]
    """command: runs a command (here or on a node) when set to other than its default; file: homelab writes a
    file there when set to other than its default; secret: a secret reference, which runs a command when it is
    `cmd:`; harmless: looked at and found to do neither."""
    what: str
    """Says what it does, for the guard's error and the README (`runs a command here`)."""


def runs(what: str) -> Effect:
    return Effect("command", what)


def writes(what: str) -> Effect:
    return Effect("file", what)


SECRET_EFFECT = Effect("secret", "a `cmd:` secret runs a command here")


def harmless(why: str) -> Effect:
    return Effect("harmless", why)


class _Spec(BaseModel):
    """Base of every spec section: frozen, unknown keys are errors, numbers finite, and no string
    holds a control character (a newline in a name would forge lines of a plan; an escape sequence
    would drive the terminal that shows it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False, allow_inf_nan=False)

    MULTILINE: ClassVar[frozenset[str]] = frozenset()
    """Fields that may hold newlines and tabs (shell commands)."""
    EFFECTS: ClassVar[Mapping[str, Effect]] = {}
    """The section's keys that run a command or choose a file homelab writes, and the look-alikes that do neither
    (see `Effect`)."""

    @model_validator(mode="before")
    @classmethod
    def _no_control_characters(cls, data: object) -> object:
        if isinstance(data, Mapping):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(key, str) else None
                if field is None:
                    continue  # an unknown key: reported as such
                bad = _MULTILINE_CONTROL_RE if key in cls.MULTILINE else _NO_CONTROL_RE
                for label, text in _strings(key, value, mapping=get_origin(field.annotation) is dict):
                    if bad.search(text):
                        allowed = "" if key not in cls.MULTILINE else " other than newline and tab"
                        raise ValueError(f"{label}: must not contain control characters{allowed}")
        return data


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}\.?$){_LABEL}(?:\.{_LABEL})*\.?$")


def check_host(value: str) -> str:
    """A host name, an IPv4 or an IPv6 address (without brackets): nothing that could add a port,
    a path or a fragment to the URLs built from it."""
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        if _HOSTNAME_RE.match(value) is None:
            raise ValueError("must be a host name, an IPv4 address or an IPv6 address") from None
        return value
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ValueError("must be an IPv6 address without a %zone")
    return value


Host = Annotated[str, AfterValidator(check_host)]


def gguf_file_name(source: str) -> str:
    """The name a GGUF file has inside a node's model volume: the base name of its path, POSIX or
    Windows (`/srv/m.gguf`, `D:/models/m.gguf`, `D:\\models\\m.gguf` → `m.gguf`)."""
    return re.split(r"[\\/]", source.rstrip("/\\"))[-1]


_ABSOLUTE_RE = re.compile(r"^(/|[A-Za-z]:[\\/]|\\\\)")


VOLUME_DATA = "_data"
"""The directory of a Docker volume (local driver) that holds its files: `<data-root>/volumes/NAME/_data`, what
`docker volume inspect NAME` gives as its Mountpoint."""


def volume_file(gguf: str, volume: str) -> str | None:
    """The path of a GGUF inside Docker volume `volume`, from its path on the node under the volume's mountpoint
    (`/var/lib/docker/volumes/llm/_data/coder/m.gguf`, `llm` → `coder/m.gguf`); None when it is not under it."""
    marker = f"/{volume}/{VOLUME_DATA}/"
    if marker not in gguf:
        return None
    inner = gguf.split(marker, 1)[1]
    parts = inner.split("/")
    if not inner or any(p in ("", ".", "..") for p in parts):
        return None
    return inner


def _check_gguf_path(value: str) -> str:
    if _ABSOLUTE_RE.match(value) is None:
        raise ValueError("must be an absolute path (/models/m.gguf or D:/models/m.gguf)")
    if value.endswith(("/", "\\")) or gguf_file_name(value) in ("", ".", ".."):
        raise ValueError("must be the path of a file, not of a directory")
    return value


# --------------------------------------------------------------------------- nodes


class SshAccess(_Spec):
    """How `homelab` reaches a node over SSH (recovery, discovery, ssh:// Docker)."""

    user: str = Field(min_length=1)
    port: Port = 22
    MULTILINE = frozenset({"sudo_password"})
    EFFECTS = {
        "key_file": harmless("read by SSH, never written"),
        "known_hosts": harmless("read by SSH, never written"),
        "sudo_password": SECRET_EFFECT,
    }
    key_file: str | None = Field(default=None, description="private key; default: the SSH agent")
    known_hosts: str = Field(default="~/.ssh/known_hosts", description="host keys are checked, never auto-accepted")
    sudo_password: SecretRef | None = Field(default=None, description="for `sudo -S`; passed through stdin only")
    connect_timeout: Duration = 10.0


class Gpu(_Spec):
    """One GPU of a node."""

    index: NonNegativeInt
    name: str = Field(min_length=1, description="model name, e.g. RTX 4090")
    vram: Size = Field(description="total memory of the card")
    reserve: Size = Field(default=0, description="kept free for the desktop, other programs")
    uuid: str | None = None

    @model_validator(mode="after")
    def _reserve_fits(self) -> Self:
        if self.vram <= 0:
            raise ValueError("vram: must be greater than 0")
        if self.reserve >= self.vram:
            raise ValueError(f"reserve: must be smaller than vram ({format_size(self.vram)})")
        return self


class NodeCpu(_Spec):
    """A node's CPU, as far as llama.cpp's memory depends on it."""

    EFFECTS = {"features": harmless("CPU flag names")}

    features: list[str] = Field(
        description="feature flags as /proc/cpuinfo spells them (x86 `flags`, ARM `Features`), e.g."
        " [avx2, avx512f, avx512_vnni, amx_int8]: they decide which weights llama.cpp repacks into"
        " a second copy in RAM (CPU_REPACK, AMX) when a model runs without a GPU; [] for a CPU with none"
        " of avx2, asimd (nothing is repacked). `homelab discover` writes the ones that matter",
    )

    @field_validator("features")
    @classmethod
    def _flags(cls, v: list[str]) -> list[str]:
        for flag in v:
            if not flag or flag != flag.strip() or " " in flag:
                raise ValueError(f"features: {flag!r} is not a CPU flag (one word, as in /proc/cpuinfo)")
        return [flag.lower() for flag in v]


class PortRange(_Spec):
    """An inclusive range of TCP ports: `3000-3099` or {start, end}."""

    start: Port
    end: Port

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: object) -> object:
        if isinstance(data, str):
            m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", data)
            if m is None:
                raise ValueError(f"must be a port range such as 3000-3099 (got {data!r})")
            return {"start": int(m[1]), "end": int(m[2])}
        if isinstance(data, int) and not isinstance(data, bool):
            return {"start": data, "end": data}
        return data

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.end < self.start:
            raise ValueError(f"range end {self.end} is below its start {self.start}")
        return self

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.start <= port <= self.end

    def __len__(self) -> int:
        return self.end - self.start + 1


class OllamaRuntime(_Spec):
    """An Ollama server on the node."""

    url: str = Field(pattern=HTTP_URL_PATTERN, description="e.g. http://192.168.1.10:11434")
    prune: bool = Field(default=False, description="delete models not in the spec (off: hand-pulled models stay)")
    keep_alive: Duration | None = Field(default=None, description="preload with this keep-alive")
    max_loaded: Annotated[int, Strict(), Field(gt=0, le=64)] = Field(
        default=1,
        description="on-demand models loaded at once by this Ollama server"
        " (its OLLAMA_MAX_LOADED_MODELS counts these and the pinned ones)",
    )


class LlamaCppRuntime(_Spec):
    """llama.cpp servers run as Docker containers on the node."""

    image: str = Field(min_length=1, description="image with llama-server, already on the node")
    ports: Annotated[
        PortRange,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "pattern": r"^\s*\d+\s*-\s*\d+\s*$"},
                    {"type": "integer", "minimum": 1, "maximum": 65535},
                    {
                        "type": "object",
                        "properties": {
                            "start": {"type": "integer", "minimum": 1, "maximum": 65535},
                            "end": {"type": "integer", "minimum": 1, "maximum": 65535},
                        },
                        "required": ["start", "end"],
                        "additionalProperties": False,
                    },
                ],
                "description": "ports the llama.cpp containers may listen on: 3000-3099 or {start, end}",
            }
        ),
    ]
    volume: Name = Field(default="homelab-models", description="Docker volume for model files")
    bind_address: Host = Field(default="0.0.0.0", description="address llama-server listens on")
    layer_order: LayerOrder = Field(
        default=LayerOrder.OUTPUT_FIRST,
        description="how this node's llama.cpp build assigns -ngl layers",
    )
    server_args: list[str] = Field(default_factory=list, description="extra llama-server args")
    EFFECTS = {"server_args": harmless("llama-server's arguments inside its container, never through a shell")}
    helper_image: str = Field(
        default="busybox:latest",
        min_length=1,
        description="small image with a shell, already on the node: copies and checks model files",
    )
    health_timeout: Duration = Field(
        default=300.0, description="how long a starting container may take to answer /health"
    )
    threads: Annotated[int, Strict(), Field(gt=0, le=4096)] | None = None
    max_loaded: Annotated[int, Strict(), Field(gt=0, le=64)] = Field(
        default=1, description="on-demand models loaded at once per swap pool (llama-server --models-max)"
    )


class DockerEndpoint(_Spec):
    """The node's Docker engine."""

    endpoint: str = Field(
        pattern=DOCKER_ENDPOINT_PATTERN,
        description="unix:///var/run/docker.sock, tcp://host:2375 or ssh://user@host",
    )
    gpu_access: GpuAccess = Field(default=GpuAccess.NVIDIA, description="how containers get GPUs: nvidia, dri, none")
    restart_command: str | None = Field(default=None, description="overrides recovery.docker_restart for this node")
    timeout: Duration = 10.0
    MULTILINE = frozenset({"restart_command"})
    EFFECTS = {"restart_command": runs("runs on the node over SSH")}


class WakeOnLan(_Spec):
    mac: str = Field(description="MAC address, aa:bb:cc:dd:ee:ff")
    broadcast: str = Field(default="255.255.255.255", description="broadcast address")
    port: Port = 9

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not _MAC_RE.match(self.mac):
            raise ValueError(f"mac: must be a MAC address such as aa:bb:cc:dd:ee:ff (got {self.mac!r})")
        try:
            ipaddress.IPv4Address(self.broadcast)
        except ValueError:
            raise ValueError(f"broadcast: must be an IPv4 address (got {self.broadcast!r})") from None
        return self


class Wake(_Spec):
    """How to wake a sleeping node: a Wake-on-LAN packet or a command (IPMI, smart plug, RDP)."""

    wol: WakeOnLan | None = None
    command: str | None = Field(default=None, min_length=1)
    stdin: SecretRef | None = Field(
        default=None,
        description="a secret written to the wake command's standard input (an IPMI or smart-plug password);"
        " never on its command line",
    )
    MULTILINE = frozenset({"command", "stdin"})
    EFFECTS = {"command": runs("a wake command runs here"), "stdin": SECRET_EFFECT}

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.wol is None) == (self.command is None):
            raise ValueError("give exactly one of `wol` or `command`")
        if self.stdin is not None and self.command is None:
            raise ValueError("stdin: is for a wake `command`")
        return self


def _default_sleep() -> dict[OsFamily, str]:
    return {
        OsFamily.LINUX: "sudo -S systemctl suspend",
        OsFamily.WINDOWS_DOCKER_DESKTOP: (
            'powershell -NoProfile -Command "Add-Type -AssemblyName System.Windows.Forms;'
            " [System.Windows.Forms.Application]::SetSuspendState('Suspend', $false, $false)\""
        ),
    }


DEFAULT_SLEEP_COMMANDS = _default_sleep()
"""`power.sleep_command` when the spec gives none, per `os` (run over SSH, the sudo password on stdin)."""


class Power(_Spec):
    """Put the node to sleep when nothing has used it for `sleep_after`; wake it when a request needs it."""

    sleep_after: Duration = Field(default=1800.0, description="idle this long (nothing served, nothing in flight)")
    sleep_command: str | None = Field(
        default=None,
        min_length=1,
        description="run on the node over SSH (`sudo -S` reads ssh.sudo_password from stdin);"
        " default per os: `sudo -S systemctl suspend` on linux",
    )
    wake_timeout: Duration = Field(default=90.0, description="how long a request waits for the node to wake")
    on_request: Literal["wait", "fallback"] = Field(
        default="wait",
        description="a request for a model on the sleeping node: wait for it (up to wake_timeout), or let the"
        " fallback answer at once while it wakes",
    )
    MULTILINE = frozenset({"sleep_command"})
    EFFECTS = {"sleep_command": runs("runs on the node over SSH")}

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.sleep_after <= 0:
            raise ValueError("sleep_after: must be greater than 0")
        if self.wake_timeout <= 0:
            raise ValueError("wake_timeout: must be greater than 0")
        return self

    def command_for(self, os: OsFamily) -> str:
        return self.sleep_command or DEFAULT_SLEEP_COMMANDS[os]


class Node(_Spec):
    """A machine of the cluster."""

    name: Name
    tier: Tier
    address: Host = Field(description="IP address or host name")
    os: OsFamily = OsFamily.LINUX
    docker: DockerEndpoint | None = None
    ssh: SshAccess | None = None
    gpus: list[Gpu] = Field(default_factory=list)
    gpu_overhead: Size | None = Field(
        default=None, description="fixed memory per GPU (CUDA context …); default from the estimator"
    )
    ram: Size = Field(description="memory of the node")
    cpu: NodeCpu | None = Field(
        default=None,
        description="the CPU's feature flags; without them a model running on the CPU is planned"
        " for the CPU that needs the most RAM for it",
    )
    ram_reserve: Size = Field(default=0, description="kept free for the OS and other programs")
    ollama: OllamaRuntime | None = None
    llamacpp: LlamaCppRuntime | None = None
    wake: Wake | None = None
    power: Power | None = Field(
        default=None, description="sleep when idle, wake on demand (needs `wake` and `ssh`; not the gateway's node)"
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.ram <= 0:
            raise ValueError("ram: must be greater than 0")
        if self.ram_reserve >= self.ram:
            raise ValueError(f"ram_reserve: must be smaller than ram ({format_size(self.ram)})")
        if self.ollama is None and self.llamacpp is None:
            raise ValueError("a node needs at least one runtime: `ollama` or `llamacpp`")
        if self.llamacpp is not None and self.docker is None:
            raise ValueError("llamacpp: needs `docker` on the node (its containers run there)")
        return self

    @property
    def runtimes(self) -> frozenset[Runtime]:
        found = set()
        if self.ollama is not None:
            found.add(Runtime.OLLAMA)
        if self.llamacpp is not None:
            found.add(Runtime.LLAMACPP)
        return frozenset(found)


# --------------------------------------------------------------------------- models


class ModelSource(_Spec):
    """Where a model's weights come from: a GGUF file on a node, or an Ollama tag."""

    gguf: Annotated[str, AfterValidator(_check_gguf_path)] | None = Field(
        default=None, description="absolute path of the .gguf file"
    )
    node: Name | None = Field(default=None, description="node that holds the file (default: the node it runs on)")
    sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    ollama: str | None = Field(default=None, description="Ollama tag, e.g. qwen2.5:14b")
    volume: Name | None = Field(
        default=None,
        description="a Docker volume on `node` (not homelab's) that already holds the file: the container mounts"
        " it read-only and reads the file where it is, nothing is copied; `gguf` is then the file's path on the"
        " node under the volume's mountpoint (`docker volume inspect`: …/volumes/NAME/_data/…)",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.gguf is None) == (self.ollama is None):
            raise ValueError("give exactly one of `gguf` (a file path) or `ollama` (a tag)")
        if self.ollama is not None and (self.node is not None or self.sha256 is not None or self.volume is not None):
            raise ValueError("`node`, `sha256` and `volume` belong to a `gguf` source, not an `ollama` one")
        if self.volume is not None and self.gguf is not None:
            if self.node is None:
                raise ValueError("volume: needs `node`, the node whose Docker engine has the volume")
            if volume_file(self.gguf, self.volume) is None:
                raise ValueError(
                    f"gguf: with `volume: {self.volume}`, give the file's path under the volume's mountpoint"
                    f" (…/volumes/{self.volume}/{VOLUME_DATA}/FILE, as `docker volume inspect` shows it)"
                )
        if self.gguf is not None and not self.gguf.strip():
            raise ValueError("gguf: must be a file path")
        return self

    @property
    def volume_path(self) -> str | None:
        """With `volume`: the file's path inside that volume; else None."""
        if self.volume is None or self.gguf is None:
            return None
        return volume_file(self.gguf, self.volume)


class Placement(_Spec):
    """Constraints on where a model may run and how much of it must be on a GPU."""

    node: Name | None = Field(default=None, description="pin to this node")
    tier: Tier | None = Field(default=None, description="pin to a node of this tier")
    gpus: list[NonNegativeInt] | None = Field(
        default=None, description="pin to these GPU indices of the node (needs `node`)"
    )
    cpu_offload: bool = Field(default=True, description="allow some layers on the CPU when the GPU is too small")
    min_gpu_layers: Annotated[int, Strict(), Field(ge=0, le=MAX_LAYERS + 1)] = Field(
        default=0, description="at least this many on a GPU"
    )
    split: bool = Field(default=False, description="allow splitting across several GPUs of one node")
    cpu_only: bool = Field(default=False, description="run with 0 GPU layers")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.gpus is not None and self.node is None:
            raise ValueError("gpus: needs `node`, since GPU indices are per node")
        if self.gpus is not None and len(set(self.gpus)) != len(self.gpus):
            raise ValueError("gpus: an index is listed twice")
        if self.gpus is not None and len(self.gpus) > 1 and not self.split:
            raise ValueError("gpus: several GPUs need `split: true`")
        if self.cpu_only and (self.min_gpu_layers > 0 or self.gpus):
            raise ValueError("`cpu_only` contradicts `min_gpu_layers` / `gpus`")
        if self.cpu_only and not self.cpu_offload:
            raise ValueError("`cpu_only` contradicts `cpu_offload: false`")
        return self


class DeclaredMemory(_Spec):
    """Memory declared by hand, for a model whose GGUF header can't be read."""

    vram: Size = Field(description="GPU memory at full offload, all included")
    ram: Size = Field(default=0, description="host memory at full offload")
    layers: Annotated[int, Strict(), Field(gt=0, le=MAX_LAYERS)] | None = Field(
        default=None, description="number of blocks, so partial offload can be planned"
    )


class Model(_Spec):
    """A model to serve."""

    name: Name
    runtime: Runtime
    source: ModelSource
    context: Annotated[int, Strict(), Field(gt=0, le=MAX_CONTEXT)] = Field(
        default=4096, description="context length in tokens"
    )
    kv_cache: KVCacheType = KVCacheType.F16
    flash_attn: bool = True
    categories: list[Category] = Field(default_factory=list)
    priority: Annotated[int, Strict(), Field(ge=0, le=1000)] = Field(default=50, description="higher is placed first")
    replicas: Annotated[int, Strict(), Field(gt=0, le=1000)] = 1
    placement: Placement = Field(default_factory=Placement)
    memory: DeclaredMemory | None = None
    port: Port | None = Field(default=None, description="fixed port (llamacpp); default: any free")
    alias: str | None = Field(default=None, description="name the server answers to (default: name)")
    parallel: Annotated[int, Strict(), Field(gt=0, le=1024)] | None = Field(
        default=None, description="llama-server -np slots"
    )
    preload: bool = Field(default=False, description="keep loaded (Ollama keep-alive)")
    args: list[str] = Field(default_factory=list, description="extra server arguments")
    EFFECTS = {"args": harmless("the server's arguments inside its container, never through a shell")}
    adopt: Name | None = Field(
        default=None,
        description="an existing container started by hand (no homelab labels) that serves this model now:"
        " the first apply replaces it with a managed one on the same port",
    )
    residency: Residency = Field(
        default=Residency.PINNED,
        description="pinned: always loaded; on-demand: loaded on request into its GPU's swap pool",
    )
    ttl: Duration | None = Field(default=None, description="on-demand: idle time before it is unloaded (default 10m)")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.adopt is not None and self.runtime is not Runtime.LLAMACPP:
            raise ValueError("adopt: is for llamacpp models (a container started by hand)")
        if self.runtime is Runtime.LLAMACPP and self.source.gguf is None:
            raise ValueError("source: a llamacpp model needs a `gguf` source")
        if self.runtime is Runtime.OLLAMA and self.source.ollama is None:
            raise ValueError("source: an ollama model needs an `ollama` source (a tag)")
        if self.runtime is Runtime.OLLAMA and self.port is not None:
            raise ValueError("port: is for llamacpp models; Ollama serves on its node's URL")
        if len(set(self.categories)) != len(self.categories):
            raise ValueError("categories: a category is listed twice")
        if self.residency is Residency.PINNED and self.ttl is not None:
            raise ValueError("ttl: is for `residency: on-demand` models (a pinned model is never unloaded)")
        if self.residency is Residency.ON_DEMAND:
            for key, set_ in (
                ("preload", self.preload),
                ("port", self.port is not None),
                ("adopt", self.adopt is not None),
                ("replicas", self.replicas != 1),
                ("placement.split", self.placement.split),
            ):
                if set_:
                    raise ValueError(
                        f"{key}: not with `residency: on-demand` (an on-demand model is one member of a swap pool)"
                    )
        if self.kv_cache is not KVCacheType.F16 and not self.flash_attn:
            raise ValueError("kv_cache: a quantized KV cache needs flash_attn: true (llama.cpp requires it)")
        return self

    @property
    def served_name(self) -> str:
        return self.alias or self.name

    @property
    def on_demand(self) -> bool:
        return self.residency is Residency.ON_DEMAND

    @property
    def idle_ttl(self) -> float:
        """Seconds idle before an on-demand model is unloaded."""
        return DEFAULT_TTL_S if self.ttl is None else self.ttl


# --------------------------------------------------------------------------- gateway


class Gateway(_Spec):
    """The LiteLLM proxy in front of the cluster."""

    node: Name | None = Field(default=None, description="node it runs on")
    mode: Literal["container", "process", "external"] = Field(
        default="external",
        description="container: homelab runs it on `node`; process: a local process; external: you run it",
    )
    image: str | None = Field(default=None, description="LiteLLM image, for mode: container")
    host: Host = "0.0.0.0"
    port: Port = 4000
    url: str | None = Field(default=None, pattern=HTTP_URL_PATTERN, description="default http://NODE:PORT")
    config_path: str = Field(default="litellm/config.yaml", description="where the config is written")
    command: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["litellm"],
        min_length=1,
        description="mode: process: the LiteLLM executable homelab starts (with --config, --host, --port)",
    )
    master_key: SecretRef = Field(description="secret:NAME or env:NAME, never the key itself")
    MULTILINE = frozenset({"master_key"})
    EFFECTS = {
        "command": runs("mode process: the gateway's command runs here"),
        "config_path": writes("homelab writes the gateway's config (and its .bak, and files beside it) there"),
        "master_key": SECRET_EFFECT,
    }
    auto_model: str = Field(default="auto", min_length=1, description="model name routed by content")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.mode == "container" and (self.image is None or self.node is None):
            raise ValueError("mode: `container` needs `image` and `node`")
        return self


# --------------------------------------------------------------------------- routing


class CategoryRoute(_Spec):
    """Preferred models of one category, best first, and where to go when none is healthy."""

    models: list[Name] = Field(default_factory=list)
    fallback: Category | None = None
    EFFECTS = {"models": harmless("model names")}


class ClassifierRule(_Spec):
    """Signals that vote for a category; added to (or replacing) the built-in defaults."""

    keywords: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    patterns: list[str] = Field(default_factory=list, description="regular expressions")
    file_extensions: list[Annotated[str, Field(pattern=FILE_EXTENSION_PATTERN)]] = Field(default_factory=list)
    weight: Annotated[float, Field(gt=0)] = 1.0
    replace_defaults: bool = False
    EFFECTS = {
        "keywords": harmless("words matched in a request"),
        "patterns": harmless("regular expressions matched in a request"),
        "file_extensions": harmless("matched in a request"),
    }

    @model_validator(mode="after")
    def _patterns_compile(self) -> Self:
        for i, pattern in enumerate(self.patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"patterns[{i}]: not a valid regular expression: {exc}") from None
        return self


EXAMPLE_CATEGORIES = (Category.CODE, Category.REASON, Category.CHAT, Category.FAST)
"""The categories a labelled example can teach: `vision` and `embed` are decided by the request's shape."""


class RoutingExample(_Spec):
    """A labelled request for the classifier's embedding stage, next to the built-in examples."""

    text: Annotated[str, Field(min_length=1)]
    category: Category

    @model_validator(mode="after")
    def _text_category(self) -> Self:
        if not self.text.strip():
            raise ValueError("text: must not be blank")
        if self.category not in EXAMPLE_CATEGORIES:
            allowed = ", ".join(c.value for c in EXAMPLE_CATEGORIES)
            raise ValueError(
                f"category: '{self.category.value}' is decided by the request's shape (an image, an embeddings body),"
                f" not by examples; use one of {allowed}"
            )
        return self


class Routing(_Spec):
    """Expert routing: which models serve each category, and how requests are classified."""

    categories: dict[Category, CategoryRoute] = Field(default_factory=dict)
    rules: dict[Category, ClassifierRule] = Field(default_factory=dict)
    default_category: Category = Category.CHAT
    fast_max_words: NonNegativeInt = Field(default=6, description="a prompt this short with no other signal is `fast`")
    examples: list[RoutingExample] = Field(
        default_factory=list,
        description="labelled requests that take part in the embedding stage like the built-in ones",
    )
    embedding: bool = Field(
        default=True,
        description="ask the cluster's embed model about requests the rules are unsure of (nearest labelled examples)",
    )
    embedding_model: str | None = Field(
        default=None, description="the model that embeds for routing (default: the first model of category embed)"
    )
    embedding_budget: Duration = Field(
        default=0.05, description="time per request for the embedding stage; past it the rules decide"
    )


# --------------------------------------------------------------------------- health, recovery, watch


class Health(_Spec):
    interval: Duration = 30.0
    timeout: Duration = 5.0
    slow_threshold: Duration = Field(default=2.0, description="slower than this is DEGRADED")
    timeouts: dict[str, Duration] = Field(
        default_factory=dict, description="per node, model or `gateway`: its own timeout"
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.interval <= 0:
            raise ValueError("interval: must be greater than 0")
        if self.timeout <= 0:
            raise ValueError("timeout: must be greater than 0")
        return self


class Backoff(_Spec):
    initial: Duration = 10.0
    max: Duration = 600.0
    factor: Annotated[float, Field(ge=1)] = 2.0
    jitter: Annotated[float, Field(ge=0, le=1)] = 0.2

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.max < self.initial:
            raise ValueError("max: must not be below initial")
        return self


def _default_restart() -> dict[OsFamily, str]:
    return {
        OsFamily.LINUX: "sudo -S systemctl restart docker",
        OsFamily.WINDOWS_DOCKER_DESKTOP: (
            "powershell -NoProfile -Command \"Stop-Process -Name 'Docker Desktop' -Force"
            " -ErrorAction SilentlyContinue; Start-Process"
            " 'C:\\Program Files\\Docker\\Docker\\Docker Desktop.exe'\""
        ),
    }


class Recovery(_Spec):
    enabled: bool = True
    attempts: PositiveInt = 5
    backoff: Backoff = Field(default_factory=Backoff)
    docker_restart: dict[OsFamily, str] = Field(default_factory=_default_restart)
    MULTILINE = frozenset({"docker_restart"})
    EFFECTS = {"docker_restart": runs("runs on a node over SSH")}
    wait_ssh: Duration = Field(default=300.0, description="how long to wait for a woken node")
    wait_docker: Duration = Field(default=120.0, description="how long to wait for Docker")


class Watch(_Spec):
    interval: Duration = Field(default=60.0, description="drift check and health every")
    state_dir: str = Field(default="~/.local/state/homelab", description="events, status, lock")
    EFFECTS = {"state_dir": writes("homelab writes its state files (events, status, lock, power) there")}
    metrics_port: Port | None = None


# --------------------------------------------------------------------------- cluster


class Cluster(_Spec):
    name: Name


class ClusterSpec(_Spec):
    """The whole desired state: the root of cluster.yaml."""

    version: Literal[1] = 1
    cluster: Cluster
    nodes: list[Node] = Field(min_length=1)
    models: list[Model] = Field(default_factory=list)
    gateway: Gateway | None = None
    routing: Routing = Field(default_factory=Routing)
    health: Health = Field(default_factory=Health)
    recovery: Recovery = Field(default_factory=Recovery)
    watch: Watch = Field(default_factory=Watch)
    secrets: dict[Name, ProviderRef] = Field(default_factory=dict, description="named references to secret providers")
    MULTILINE = frozenset({"secrets"})
    EFFECTS = {"secrets": SECRET_EFFECT}

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def model(self, name: str) -> Model:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)


def marked_keys(root: type[_Spec] = ClusterSpec) -> list[tuple[str, Effect]]:
    """Every key of the spec marked as running a command or writing a file (not the harmless ones), spelt as the
    README lists them (`nodes[].wake.command`, `secrets.NAME`), in the order of the model's fields."""
    out: list[tuple[str, Effect]] = []

    def walk(cls: type[_Spec], prefix: str) -> None:
        for name, info in cls.model_fields.items():
            key = f"{prefix}{name}"
            effect = cls.EFFECTS.get(name)
            if effect is not None and effect.kind != "harmless":
                dict_of = get_origin(_optional(info.annotation)) is dict
                out.append((f"{key}.{'NAME' if effect.kind == 'secret' else 'KEY'}" if dict_of else key, effect))
            for sub, many in _sections_of(info.annotation):
                walk(sub, f"{key}{'[]' if many == 'list' else '.KEY' if many == 'dict' else ''}.")

    walk(root, "")
    return out


def _optional(annotation: object) -> object:
    """`X | None` → X."""
    if get_origin(annotation) not in (Union, UnionType):
        return annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def _sections_of(annotation: object) -> list[tuple[type[_Spec], str]]:
    """The spec sections a field holds: itself (`one`), a list of them or a mapping to them."""
    inner = _optional(annotation)
    origin = get_origin(inner)
    if isinstance(inner, type) and issubclass(inner, _Spec):
        return [(inner, "one")]
    if origin in (list, dict):
        item = _optional(get_args(inner)[-1])
        if isinstance(item, type) and issubclass(item, _Spec):
            return [(item, "list" if origin is list else "dict")]
    return []
