"""Port stability (issue 28, item 1): a running llama.cpp container keeps its port under any add, remove or
edit that does not require otherwise; a new container takes the lowest port nobody keeps."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core.desired import container_name, render
from controller.core.resolve import current_ports
from controller.core.state import ClusterState
from solver.problem import Assignment, PlacementResult
from specs.model import ClusterSpec

NODES = ("n0", "n1", "n2")
PORTS = (3000, 3031)


@dataclass
class Want:
    """One llama.cpp model: its replicas (on the first `replicas` nodes), its context and a fixed port or none."""

    replicas: int = 1
    context: int = 4096
    port: int | None = None


@dataclass
class Lab:
    models: dict[str, Want] = field(default_factory=dict)

    def spec(self) -> ClusterSpec:
        nodes = [
            {
                "name": n,
                "tier": "remote",
                "address": f"10.0.0.{i + 1}",
                "ram": 256 << 30,
                "docker": {"endpoint": "unix:///var/run/docker.sock"},
                "llamacpp": {"image": "llama", "ports": f"{PORTS[0]}-{PORTS[1]}"},
            }
            for i, n in enumerate(NODES)
        ]
        models = [
            {
                "name": name,
                "runtime": "llamacpp",
                "source": {"gguf": f"/m/{name}.gguf"},
                "memory": {"vram": 1 << 30, "layers": 8},
                "context": w.context,
                "replicas": w.replicas,
                **({"port": w.port} if w.port is not None else {}),
            }
            for name, w in self.models.items()
        ]
        return ClusterSpec.model_validate({"cluster": {"name": "t"}, "nodes": nodes, "models": models})

    def placement(self) -> PlacementResult:
        """Replica r of every model on node r, on the CPU (the placement is not what is tested here)."""
        assignments = tuple(
            Assignment(
                model=name,
                replica=r,
                node=NODES[r],
                gpus=(),
                gpu_layers=0,
                layers=9,
                vram_bytes={},
                ram_bytes=1 << 30,
                context=w.context,
            )
            for name, w in sorted(self.models.items())
            for r in range(w.replicas)
        )
        return PlacementResult("OPTIMAL", assignments, (), (), 0)

    def render(self, running: ClusterState | None) -> ClusterState:
        return render(self.spec(), self.placement(), current_ports(running) if running is not None else None)


def ports_of(state: ClusterState) -> dict[tuple[str, str], int]:
    return {(n.node, c.name): c.config.port for n in state.nodes.values() for c in n.containers if c.config}


def hashes_of(state: ClusterState) -> dict[tuple[str, str], str]:
    return {(n.node, c.name): c.config_hash for n in state.nodes.values() for c in n.containers}


def test_a_model_that_sorts_first_moves_no_running_container() -> None:
    """The issue's case: four containers run on 3000-3003; `assistant` sorts before all of them."""
    lab = Lab({name: Want() for name in ("chatter", "coder", "embedder", "generalist")})
    before = lab.render(None)
    assert {c.name: c.config.port for c in before.nodes["n0"].containers if c.config} == {
        "homelab-chatter": 3000,
        "homelab-coder": 3001,
        "homelab-embedder": 3002,
        "homelab-generalist": 3003,
    }
    lab.models["assistant"] = Want()
    after = lab.render(before)
    ports = ports_of(after)
    for key, port in ports_of(before).items():
        assert ports[key] == port, f"{key[1]} moved from {port} to {ports[key]}"
    assert hashes_of(after).items() >= hashes_of(before).items()  # no running container is replaced
    assert ports["n0", "homelab-assistant"] == 3004


def test_a_new_container_takes_the_lowest_port_nobody_keeps() -> None:
    lab = Lab({name: Want() for name in ("b", "c", "d")})
    before = lab.render(None)  # b 3000, c 3001, d 3002
    del lab.models["c"]
    lab.models["a"] = Want()
    after = ports_of(lab.render(before))
    assert after == {("n0", "homelab-a"): 3001, ("n0", "homelab-b"): 3000, ("n0", "homelab-d"): 3002}


def test_a_fixed_port_still_takes_precedence_over_a_kept_one() -> None:
    lab = Lab({"b": Want(), "c": Want()})
    before = lab.render(None)  # b 3000, c 3001
    lab.models["a"] = Want(port=3000)
    after = ports_of(lab.render(before))
    assert after == {("n0", "homelab-a"): 3000, ("n0", "homelab-b"): 3002, ("n0", "homelab-c"): 3001}


NAMES = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=6)
EDITS = st.one_of(
    st.tuples(st.just("add-first"), st.integers(1, 3)),
    st.tuples(st.just("add"), NAMES, st.integers(1, 3)),
    st.tuples(st.just("remove"), st.integers(0, 20)),
    st.tuples(st.just("context"), st.integers(0, 20), st.sampled_from([2048, 4096, 8192, 16384])),
    st.tuples(st.just("replicas"), st.integers(0, 20), st.integers(1, 3)),
)


@settings(max_examples=60, deadline=None)
@given(
    start=st.dictionaries(NAMES, st.integers(1, 3), min_size=1, max_size=5),
    fixed=st.booleans(),
    edits=st.lists(EDITS, min_size=1, max_size=12),
)
def test_random_edits_change_no_port_that_need_not_change(
    start: dict[str, int], fixed: bool, edits: list[tuple[object, ...]]
) -> None:
    lab = Lab({name: Want(replicas=r) for name, r in start.items()})
    if fixed:
        lab.models["zz-fixed"] = Want(port=3010)  # a fixed port nobody else is ever given
    state = lab.render(None)
    first = 999
    for edit in edits:
        names = sorted(lab.models)
        kind = edit[0]
        edited: str | None = None
        if kind == "add-first":
            assert isinstance(edit[1], int)
            name = f"0{first:03d}"  # sorts before every name so far
            first -= 1
            lab.models[name] = Want(replicas=edit[1])
        elif kind == "add":
            assert isinstance(edit[1], str) and isinstance(edit[2], int)
            if edit[1] in lab.models or len(lab.models) >= 12:
                continue
            lab.models[edit[1]] = Want(replicas=edit[2])
        elif kind == "remove":
            assert isinstance(edit[1], int)
            if len(names) <= 1:
                continue
            del lab.models[names[edit[1] % len(names)]]
        elif kind == "context":
            assert isinstance(edit[1], int) and isinstance(edit[2], int)
            edited = names[edit[1] % len(names)]
            lab.models[edited].context = edit[2]
        else:
            assert isinstance(edit[1], int) and isinstance(edit[2], int)
            edited = names[edit[1] % len(names)]
            lab.models[edited].replicas = edit[2]
        after = lab.render(state)
        old_ports, new_ports = ports_of(state), ports_of(after)
        old_hashes, new_hashes = hashes_of(state), hashes_of(after)
        for key, port in old_ports.items():
            if key in new_ports:
                assert new_ports[key] == port, f"{edit}: {key} moved from {port} to {new_ports[key]}"
                if edited is None or key[1] != container_name(edited):
                    assert new_hashes[key] == old_hashes[key], f"{edit}: {key} would be replaced"
        for node in NODES:
            on_node = [p for (n, _), p in new_ports.items() if n == node]
            assert len(on_node) == len(set(on_node)), f"{edit}: two containers share a port on {node}"
            assert all(PORTS[0] <= p <= PORTS[1] for p in on_node)
        state = after
