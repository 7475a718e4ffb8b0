"""Desired vs observed state → changes, each with a reason.

Pure. deepdiff describes what changed in a container's configuration; its
types never leave this module.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from specs.lazy import LazyModule

if TYPE_CHECKING:
    import deepdiff
else:  # deepdiff (and pandas, numpy under it) only when a command diffs states
    deepdiff = LazyModule("deepdiff")

from controller.core.gateway_config import config_diff
from controller.core.state import (
    ClusterState,
    ContainerConfig,
    ContainerState,
    FileState,
    GatewayState,
    NodeState,
    OllamaModelState,
    OllamaNodeState,
    VolumeState,
)
from specs.errors import HomelabError


class PortConflict(HomelabError):
    """A managed container would take the port of a container homelab does not manage (and does not adopt)."""


class MissingVolume(HomelabError):
    """A model is read from a volume of the user's (`source.volume`) that is not on its node."""


class MissingHelperImage(HomelabError):
    """A node's helper image (`llamacpp.helper_image`), which copies and removes model files, is not on it."""


ADOPT = "adopt"
"""The kind of the change that replaces a container started by hand (`adopt:`) with a managed one."""

BIND_MOUNT_WARNING = (
    "its model is read through a bind mount of {dir} (slow and fragile on Windows Docker hosts):"
    " copied into the model volume {volume}"
)
IN_VOLUME = "its model stays in Docker volume {volume} (mounted read-only, not copied)"
COPIED = "its model is copied into the model volume {volume}"


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    """In place: start a stopped container."""
    REPLACE = "replace"
    DELETE = "delete"


GLYPH = {Action.CREATE: "+", Action.UPDATE: "~", Action.REPLACE: "-/+", Action.DELETE: "-"}

Resource = ContainerState | FileState | VolumeState | OllamaModelState | GatewayState

GATEWAY_NODE = ""
"""The `node` of gateway changes and steps: they belong to no node and run after all of them."""


@dataclass(frozen=True)
class Change:
    action: Action
    kind: str
    """volume, file, container, ollama-tag (a pulled base tag), ollama-model (a derived model), service
    (the gateway's container on a node) or gateway."""
    node: str
    name: str
    reason: str
    before: Resource | None = None
    after: Resource | None = None
    detail: str = ""
    """More than a line of explanation: the unified diff of the gateway config."""


@dataclass(frozen=True)
class DiffResult:
    changes: tuple[Change, ...]
    unreachable: Mapping[str, str] = field(default_factory=dict)
    """Nodes that could not be observed, with why: nothing is planned for them."""
    deferred: tuple[Change, ...] = ()
    """What an unreachable node would need if it turned out empty: shown, never planned."""

    @property
    def empty(self) -> bool:
        return not self.changes


def describe_config_change(old: ContainerConfig | None, new: ContainerConfig) -> str:
    """`context 8192 → 16384, gpu_layers 28 → 33` — what differs, derived fields (the command) last."""
    if old is None:
        return "its configuration label is missing or unreadable"
    before, after = old.to_json(), new.to_json()
    # the command and a pool's preset are derived from the other fields: they are described only when nothing else is
    parts = _describe(
        deepdiff.DeepDiff(before, after, exclude_paths=["root['command']", "root['preset']"], verbose_level=2)
    )
    if not parts:
        removed = [a for a in before["command"] if a not in after["command"]]
        added = [a for a in after["command"] if a not in before["command"]]
        if removed or added:
            parts.append(f"command {' '.join(removed) or '(none)'} → {' '.join(added) or '(none)'}")
        else:
            parts.append("command " + " ".join(before["command"]) + " → " + " ".join(after["command"]))
    return ", ".join(parts)


def _describe(dd: Any) -> list[str]:
    out: list[str] = []
    for path, change in dd.get("values_changed", {}).items():
        out.append(f"{_field(path)} {change['old_value']} → {change['new_value']}")
    for path, change in dd.get("type_changes", {}).items():
        out.append(f"{_field(path)} {change['old_value']} → {change['new_value']}")
    for key in ("iterable_item_added", "iterable_item_removed", "dictionary_item_added", "dictionary_item_removed"):
        for path in dd.get(key, {}):
            verb = "added" if key.endswith("added") else "removed"
            out.append(f"{_field(path)} {verb}")
    return sorted(out)


def _field(path: str) -> str:
    """root['gpus'][0] → gpus[0]."""
    return path.removeprefix("root").replace("['", ".").replace("']", "").lstrip(".")


def diff(desired: ClusterState, observed: ClusterState, *, unplaced: Collection[str] = ()) -> DiffResult:
    """Every change that would make `observed` match `desired`, node by node (`unplaced`: the spec's models the
    placement left out, so that their containers' removal says why)."""
    runs_on: dict[str, set[str]] = {}
    for node_name, node_state in desired.nodes.items():
        for c in node_state.containers:
            runs_on.setdefault(c.model, set()).add(node_name)

    def why_gone(c: ContainerState) -> str:
        if c.model in unplaced:
            return "not placed: see the warnings"
        others = sorted(runs_on.get(c.model, set()) - {c.node})
        if others:
            return f"{c.model} is placed on {', '.join(others)} now"
        return f"fewer replicas of {c.model} wanted" if c.model in runs_on else "not in spec"

    changes: list[Change] = []
    deferred: list[Change] = []
    unreachable: dict[str, str] = {}
    for name, want in desired.nodes.items():
        have = observed.nodes.get(name)
        if have is None:
            have = NodeState(node=name, reachable=False, error="not observed")
        if not have.reachable:
            if want.containers or want.volumes or want.files:
                unreachable[name] = have.error or "unreachable"
                deferred.extend(_node_changes(want, NodeState(node=name), why_gone))
        else:
            _check_user_volumes(want, have)
            changes.extend(_node_changes(want, have, why_gone))
        if want.ollama is not None:
            got = have.ollama  # observed over HTTP whether or not the node's Docker engine answered
            if got is None or not got.reachable:
                # said even when nothing is placed there: its models may be unplaced because it did not answer
                why = (got.error if got is not None else None) or have.error or "not observed"
                if why not in unreachable.get(name, ""):
                    unreachable[name] = f"{unreachable[name]}; {why}" if name in unreachable else why
                deferred.extend(_ollama_changes(name, want.ollama, OllamaNodeState(url=want.ollama.url)))
            else:
                changes.extend(_ollama_changes(name, want.ollama, got))
    for name, have in observed.nodes.items():
        if name in desired.nodes or not have.reachable:
            continue
        # A node that left the spec: its managed containers go.
        changes.extend(
            Change(Action.DELETE, "container", name, c.name, "node not in spec", before=c) for c in have.containers
        )
    gateway = _gateway_changes(desired.gateway, observed.gateway)
    gw_node = desired.gateway.node if desired.gateway is not None else None
    if gw_node is not None and (
        gw_node in unreachable or not observed.nodes.get(gw_node, NodeState(gw_node)).reachable
    ):
        deferred.extend(gateway)  # its container runs on a node that did not answer
    else:
        changes.extend(gateway)
    return DiffResult(tuple(changes), unreachable, tuple(deferred))


def _ollama_changes(node: str, want: OllamaNodeState, have: OllamaNodeState) -> list[Change]:
    """Pull missing base tags, create or re-create derived models, preload; delete only what is ours or pruned."""
    out: list[Change] = []
    have_models = {m.name: m for m in have.models}
    want_models = {m.name: m for m in want.models}
    for m in have.models:
        if m.name not in want_models:
            out.append(Change(Action.DELETE, "ollama-model", node, m.name, "not in spec", before=m))
    if want.prune:
        for tag in have.tags:
            if tag not in want.tags:
                out.append(Change(Action.DELETE, "ollama-tag", node, tag, "not in spec (ollama.prune: true)"))
    for tag in want.tags:
        if tag not in have.tags:
            out.append(Change(Action.CREATE, "ollama-tag", node, tag, "not pulled on this node"))
    for m in want.models:
        got = have_models.get(m.name)
        params = f"num_gpu {m.num_gpu}, num_ctx {m.num_ctx}"
        if got is None:
            out.append(Change(Action.CREATE, "ollama-model", node, m.name, f"from {m.base}: {params}", after=m))
            continue
        changed = [
            f"{what} {old} → {new}"
            for what, old, new in (
                ("base", got.base, m.base),
                ("num_gpu", got.num_gpu, m.num_gpu),
                ("num_ctx", got.num_ctx, m.num_ctx),
            )
            if old != new
        ]
        if changed:
            reason = "parameters changed: " + ", ".join(changed)
            out.append(Change(Action.REPLACE, "ollama-model", node, m.name, reason, before=got, after=m))
        elif m.preload and not got.preload:
            keep = "until Ollama stops" if m.keep_alive is None else f"keep-alive {m.keep_alive:g}s"
            out.append(Change(Action.UPDATE, "ollama-model", node, m.name, f"not loaded: preload ({keep})", got, m))
    return out


def _gateway_changes(want: GatewayState | None, have: GatewayState | None) -> list[Change]:
    if want is None:
        return []
    if have is None or have.text != want.text:
        exists = have is not None and have.text is not None
        detail = config_diff(have.text if have is not None else None, want.text, want.path)
        action = Action.UPDATE if exists else Action.CREATE
        reason = "config changed" if exists else "config file does not exist"
        if want.mode != "external":
            reason += ": write it, restart the proxy"
        return [Change(action, "gateway", GATEWAY_NODE, want.path, reason, before=have, after=want, detail=detail)]
    if want.mode == "container" and have.run_hash != want.run_hash:
        if have.run_hash:
            reason = "its container runs differently from the spec (image, host, port or key variable): re-create it"
        else:
            reason = "its container does not exist: create it"
        return [Change(Action.UPDATE, "gateway", GATEWAY_NODE, want.path, reason, before=have, after=want)]
    if not have.running:
        reason = "the proxy does not answer /health/liveliness: restart it"
        return [Change(Action.UPDATE, "gateway", GATEWAY_NODE, want.path, reason, before=have, after=want)]
    return []


def _check_user_volumes(want: NodeState, have: NodeState) -> None:
    """A container that reads its model from a volume of the user's needs that volume on the node: Docker would
    otherwise create it empty at the container's start, and (after an adoption) the model would be down."""
    for c in want.containers:
        if c.config is not None and c.config.volume != want.model_volume and c.config.volume not in have.volume_names:
            raise MissingVolume(
                f"node {want.node}: model {c.model} reads {c.config.model_file} from Docker volume {c.config.volume}"
                " (its source.volume), which is not on the node"
            )


def _adoptions(want: NodeState, have: NodeState) -> list[Change]:
    """`~ adopt container mark-i → homelab-m (same port 3009)` for each adopted container still there; a managed
    container on the port of an unlabelled one that is not adopted is a PortConflict naming it."""
    out: list[Change] = []
    foreign = {f.name: f for f in have.foreign}
    adopted = {old: new for new, old in want.adopts}
    by_name = {c.name: c for c in want.containers}
    for old, new in sorted(adopted.items()):
        f = foreign.get(old)
        c = by_name.get(new)
        if f is None or c is None or c.config is None:
            continue  # adopted already (or never there): the managed container is planned as usual
        port = c.config.port
        same = f"same port {port}" if port in f.ports else f"port {', '.join(map(str, f.ports)) or 'none'} → {port}"
        reason = f"{new} ({same}); "
        if c.config.volume != want.model_volume:
            reason += IN_VOLUME.format(volume=c.config.volume)
        elif f.bind_model is not None:
            reason += BIND_MOUNT_WARNING.format(dir=f.bind_model, volume=c.config.volume)
        else:
            reason += COPIED.format(volume=c.config.volume)
        out.append(Change(Action.UPDATE, ADOPT, want.node, old, reason, after=c))
    running = {h.name for h in have.containers if h.status == "running"}
    for c in want.containers:
        if c.config is None or c.name in running:  # a stopped one must bind its port again when it starts
            continue
        for f in have.foreign:
            if f.running and c.config.port in f.ports and adopted.get(f.name) != c.name:
                raise PortConflict(
                    f"node {want.node}: container {c.name} would listen on port {c.config.port}, which container"
                    f" {f.name} (not managed by homelab) holds; adopt it (`adopt: {f.name}` on model {c.model})"
                    " or give the model another port"
                )
    return out


def _model_files(config: ContainerConfig) -> list[str]:
    """The model files a container reads: its model's, or every member's of a swap pool."""
    return [m.model_file for m in config.members] if config.pool else [config.model_file]


def file_damage(want: FileState, got: FileState) -> str | None:
    """Why a model file in a volume is not its source (`size 1234 of 5678 bytes`, `sha256 differs`), or None when
    nothing says so: its size is the source's (when known) and its sha256, when it was checked, the spec's."""
    if want.size is not None and got.size != want.size:
        return f"size {got.size} of {want.size} bytes"
    if want.sha256 is not None and got.sha256 is not None and got.sha256.lower() != want.sha256.lower():
        return "sha256 differs"
    return None


def _node_changes(want: NodeState, have: NodeState, why_gone: Callable[[ContainerState], str]) -> list[Change]:
    out: list[Change] = []
    node = want.node
    have_volumes = {v.name for v in have.volumes}
    for v in want.volumes:
        if v.name not in have_volumes:
            out.append(Change(Action.CREATE, "volume", node, v.name, "volume does not exist", after=v))
    have_files = {(f.volume, f.name): f for f in have.files}
    changed_files: set[tuple[str, str]] = set()
    for f in want.files:
        got = have_files.get((f.volume, f.name))
        if got is None:
            out.append(Change(Action.CREATE, "file", node, f"{f.volume}/{f.name}", f"copy from {f.source}", after=f))
            changed_files.add((f.volume, f.name))
        elif (damage := file_damage(f, got)) is not None:
            reason = f"damaged: {damage}: copy it again from {f.source}"
            out.append(Change(Action.REPLACE, "file", node, f"{f.volume}/{f.name}", reason, before=got, after=f))
            changed_files.add((f.volume, f.name))
    wanted_files = {(f.volume, f.name) for f in want.files}
    for got in have.files:
        if got.volume != want.model_volume:
            continue  # never the gateway's volume, nor a model volume the spec no longer names
        if (got.volume, got.name) not in wanted_files and got.name not in want.spec_files:
            reason = "no model in the spec uses it"
            out.append(Change(Action.DELETE, "file", node, f"{got.volume}/{got.name}", reason, before=got))
    have_containers = {c.name: c for c in have.containers}
    out.extend(_adoptions(want, have))
    for c in want.containers:
        current = have_containers.get(c.name)
        assert c.config is not None
        if current is None:
            out.append(Change(Action.CREATE, "container", node, c.name, "not running on this node", after=c))
        elif current.config_hash != c.config_hash:
            reason = "config changed: " + describe_config_change(current.config, c.config)
            out.append(Change(Action.REPLACE, "container", node, c.name, reason, before=current, after=c))
        elif any((c.config.volume, f) in changed_files for f in _model_files(c.config)):
            out.append(Change(Action.REPLACE, "container", node, c.name, "model file changed", before=current, after=c))
        elif current.status in ("exited", "created"):
            why = f"container {current.status}" + (f" (code {current.exit_code})" if current.status == "exited" else "")
            out.append(Change(Action.UPDATE, "container", node, c.name, why + ": start it", before=current, after=c))
        elif current.status in ("dead", "paused", "restarting", "removing"):
            out.append(
                Change(
                    Action.REPLACE, "container", node, c.name, f"container {current.status}", before=current, after=c
                )
            )
    for service in have.services:
        if service not in want.services:
            reason = "the gateway no longer runs on this node"
            out.append(Change(Action.DELETE, "service", node, service, reason))
    wanted = {c.name for c in want.containers}
    for extra in have.containers:
        if extra.name not in wanted:
            out.append(Change(Action.DELETE, "container", node, extra.name, why_gone(extra), before=extra))
    _check_helper_image(node, have, out)
    return out


def _check_helper_image(node: str, have: NodeState, changes: list[Change]) -> None:
    """A plan with file steps on a node needs its helper image there: the dry run says so, not the apply."""
    image = have.missing_helper_image
    files = sorted(c.name for c in changes if c.kind == "file")
    if image is None or not files:
        return
    more = f" and {len(files) - 1} more" if len(files) > 1 else ""
    raise MissingHelperImage(
        f"node {node}: helper image {image} (llamacpp.helper_image), which copies model files ({files[0]}{more}),"
        f" is not on the node; get it there with `docker pull {image}` on the node (or `docker save {image}` here"
        " and `docker load` there), or name an image the node has"
    )
