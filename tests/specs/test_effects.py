"""Every spec key that runs a command or writes a file is marked in the model (`specs.model.Effect`), and the
`watch --git` guard (`specs.validate.command_keys`) finds each one from those marks alone."""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, get_args, get_origin

from pydantic import AfterValidator, BaseModel, Field

from specs import parse_spec
from specs.model import ClusterSpec, Effect, Gateway, _check_provider_ref, _check_secret_ref, _Spec, marked_keys
from specs.validate import command_keys

LOOKS_LIKE = re.compile(r"command|cmd|path|file|script|exec")
"""A key with one of these in its name may run a command or write a file: it must be classified."""


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """(the type, its Annotated metadata), `X | None` taken as X."""
    metadata: list[Any] = []
    while True:
        if get_origin(annotation) is Annotated:
            annotation, *extra = get_args(annotation)
            metadata.extend(extra)
        elif get_origin(annotation) in (typing.Union, types.UnionType):
            rest = [a for a in get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation, metadata
            annotation = rest[0]
        else:
            return annotation, metadata


def _is_secret(metadata: list[Any]) -> bool:
    return any(isinstance(m, AfterValidator) and m.func in (_check_secret_ref, _check_provider_ref) for m in metadata)


def _suspicious(annotation: Any) -> str | None:
    """Why a field's type may carry a command: a secret reference, or a list or mapping of plain strings."""
    inner, metadata = _unwrap(annotation)
    if _is_secret(metadata):
        return "a secret reference (cmd: runs a command)"
    origin = get_origin(inner)
    if origin in (list, tuple, dict):
        args = get_args(inner)
        item, item_meta = _unwrap(args[-1]) if args else (None, [])
        if _is_secret(item_meta):
            return "secret references (cmd: runs a command)"
        if item is str:
            return "a list or mapping of strings (a command list?)"
    return None


def _sections(root: type[BaseModel]) -> Iterator[type[BaseModel]]:
    seen: set[type[BaseModel]] = set()
    todo = [root]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        yield cls
        for info in cls.model_fields.values():
            stack = [info.annotation]
            while stack:
                t = stack.pop()
                if isinstance(t, type) and issubclass(t, BaseModel):
                    todo.append(t)
                stack.extend(get_args(t))


def unclassified(root: type[BaseModel]) -> list[str]:
    """Each field of the model tree under `root` that looks like it runs a command or writes a file and has no
    mark in its section's EFFECTS; and each mark that names no field."""
    problems: list[str] = []
    for cls in _sections(root):
        effects = getattr(cls, "EFFECTS", {})
        for name, info in cls.model_fields.items():
            why = "its name" if LOOKS_LIKE.search(name) else _suspicious(info.annotation)
            if why is not None and name not in effects:
                problems.append(f"{cls.__name__}.{name} ({why}): mark it in {cls.__name__}.EFFECTS")
        problems += [f"{cls.__name__}.EFFECTS names {k}, not a field" for k in effects if k not in cls.model_fields]
    return problems


def test_every_key_that_may_run_a_command_or_write_a_file_is_classified() -> None:
    assert unclassified(ClusterSpec) == []


def test_a_new_unmarked_key_is_caught() -> None:
    """The walk above can fail: a section that grows a `post_script`, a command list or a secret without a mark."""

    class Hooks(_Spec):
        post_script: str | None = None
        argv: list[str] = Field(default_factory=list)
        token: Annotated[str, AfterValidator(_check_secret_ref)] | None = None
        EFFECTS: ClassVar[Mapping[str, Effect]] = {"gone": Gateway.EFFECTS["command"]}

    class Root(_Spec):
        hooks: Hooks | None = None

    found = unclassified(Root)
    assert len(found) == 4
    assert [f.split(" ")[0] for f in found] == ["Hooks.post_script", "Hooks.argv", "Hooks.token", "Hooks.EFFECTS"]


SPEC = """\
cluster: {name: lab}
nodes:
  - name: a
    tier: local
    address: 10.0.0.2
    ram: 8GiB
    ollama: {url: "http://10.0.0.2:11434"}
    ssh: {user: u, sudo_password: "cmd:pass show sudo"}
    wake: {command: "wake-a", stdin: "cmd:pass show ipmi"}
    power: {sleep_command: "halt"}
    docker: {endpoint: "unix:///var/run/docker.sock", restart_command: "reboot"}
gateway:
  mode: process
  command: [sh, -c, "touch /tmp/x"]
  config_path: /etc/victim
  master_key: "cmd:pass show key"
recovery:
  docker_restart: {linux: "rm -rf /"}
watch: {state_dir: /etc}
secrets: {k: "cmd:id", e: "env:K"}
"""


def test_command_keys_finds_every_marked_key() -> None:
    found = dict(command_keys(parse_spec(SPEC, "cluster.yaml").spec))
    assert sorted(found) == sorted(
        [
            ("nodes", 0, "ssh", "sudo_password"),
            ("nodes", 0, "wake", "command"),
            ("nodes", 0, "wake", "stdin"),
            ("nodes", 0, "power", "sleep_command"),
            ("nodes", 0, "docker", "restart_command"),
            ("gateway", "command"),
            ("gateway", "config_path"),
            ("gateway", "master_key"),
            ("recovery", "docker_restart", "linux"),
            ("watch", "state_dir"),
            ("secrets", "k"),
        ]
    )
    assert found[("gateway", "command")] == "mode process: the gateway's command runs here"


def test_the_gateway_defaults_are_not_the_specs_own() -> None:
    """The default `litellm` command and config path are homelab's, not the spec's: not reported."""
    text = 'cluster: {name: lab}\nnodes: [{name: a, tier: local, address: a, ram: 1GiB, ollama: {url: "http://a:1"}}]\n'
    text += "gateway: {mode: process, master_key: env:K}\n"
    assert command_keys(parse_spec(text, "cluster.yaml").spec) == []


def test_the_readme_lists_exactly_the_marked_keys() -> None:
    """README's "Security: a spec is code" table names every marked key, and only those."""
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Security: a spec is code\n", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)
    assert listed == [key for key, _ in marked_keys()]
