"""Model files are checked on observe (size, and sha256 where the spec gives one) and a damaged one is copied again.

With the shipped fake Docker engine: observe → desired (the source's size) → diff → plan text → apply.
"""

from __future__ import annotations

import json
from pathlib import Path

from controller.core.diff import file_damage
from controller.core.plan import Plan, render_text
from controller.core.state import LABEL_CLUSTER, LABEL_ROLE, LABEL_WRITES, FileState
from controller.drivers.fake import FakeDockerNode
from controller.effects.apply import EVENTS_FILE
from controller.effects.engine import CachingConnect, Prepared, Session, Wiring
from controller.effects.observe import SHA256_CACHE_FILE, read_sha256_cache
from solver.place import SolveParams
from specs import parse_spec
from specs.model import ClusterSpec, Node
from tests.support.wiring import prepare

SHA = "ab" * 32
NODE_SOURCE = "/srv/models/chat.gguf"


def spec_of(gguf: str, *, node: bool = False, sha256: str | None = None) -> ClusterSpec:
    source = f'{{gguf: "{gguf}"' + (", node: box" if node else "") + (f", sha256: {sha256}" if sha256 else "") + "}"
    text = f"""\
cluster: {{name: lab}}
nodes:
  - name: box
    tier: remote
    address: 127.0.0.1
    docker: {{endpoint: "unix:///tmp/none.sock"}}
    gpus: [{{index: 0, name: RTX 3090, vram: 24GiB}}]
    ram: 64GiB
    llamacpp: {{image: "llama:test", ports: 3000-3009, volume: models}}
models:
  - name: chat
    runtime: llamacpp
    source: {source}
    placement: {{node: box, gpus: [0]}}
    memory: {{vram: 10GiB, layers: 32}}
"""
    return parse_spec(text, "cluster.yaml").spec


class Lab:
    def __init__(self, sources: dict[str, int]) -> None:
        self.box = FakeDockerNode("box", images={"llama:test"}, source_files=dict(sources))

    def connect(self, node: Node) -> FakeDockerNode:
        return self.box

    def prepare(self, spec: ClusterSpec, state: Path | None = None) -> Prepared:
        return prepare(spec, CachingConnect(self.connect), SolveParams(time_limit=5, workers=1), state=state)

    def apply(self, spec: ClusterSpec, state: Path) -> Plan:
        """As `reconcile` applies: plan, apply, then keep what the new containers hold (and the sha256s)."""
        wiring = Wiring(connect=lambda _spec: self.connect, gpu_probe=lambda _nodes: {}, health_check=lambda *_: None)
        with Session(spec, wiring, state) as session:
            prepared = session.prepare(gateway=False, gpus=False)
            result = session.executor(prepared).apply(prepared.plan)
            assert result.ok, result.summary()
            session.calibrate()
        return prepared.plan


def calls(box: FakeDockerNode, method: str) -> list[str]:
    return [name for m, name in box.calls if m == method]


def test_a_truncated_copy_of_a_local_gguf_is_copied_again(tmp_path: Path) -> None:
    gguf = tmp_path / "chat.gguf"
    gguf.write_bytes(b"x" * 5678)  # the controller sees the source: its size is what the copy must have
    lab = Lab({str(gguf): 5678})
    spec = spec_of(str(gguf))
    lab.apply(spec, tmp_path / "state")
    assert lab.prepare(spec).plan.in_sync
    lab.box.volumes["models"]["chat.gguf"] = 1234  # truncated in the volume
    plan = lab.prepare(spec).plan
    assert render_text(plan) == (
        "node box:\n"
        f"  -/+ file models/chat.gguf  (damaged: size 1234 of 5678 bytes: copy it again from {gguf})\n"
        "  -/+ container homelab-chat  (model file changed)\n"
        "Plan: 2 to add, 0 to change, 2 to destroy.\n"
    )
    assert [(s.kind.value, s.name) for s in plan.steps] == [
        ("remove-container", "homelab-chat"),
        ("copy-file", "models/chat.gguf"),
        ("run-container", "homelab-chat"),
        ("wait-healthy", "homelab-chat"),
    ]
    lab.apply(spec, tmp_path / "state")
    assert lab.box.volumes["models"]["chat.gguf"] == 5678
    assert lab.prepare(spec).plan.in_sync


def test_a_source_on_the_node_is_sized_by_the_helper_that_lists_the_volume(tmp_path: Path) -> None:
    lab = Lab({NODE_SOURCE: 5678})  # not on this machine: only the node has it
    spec = spec_of(NODE_SOURCE, node=True)
    lab.apply(spec, tmp_path)
    lab.box.volumes["models"]["chat.gguf"] = 99
    lab.box.calls.clear()
    prepared = lab.prepare(spec)
    assert calls(lab.box, "scan_files") == ["models"]  # one helper run: the volume's files and the source's size
    assert prepared.observed.nodes["box"].source_sizes == ((NODE_SOURCE, 5678),)
    assert "(damaged: size 99 of 5678 bytes: copy it again from /srv/models/chat.gguf)" in render_text(prepared.plan)
    lab.apply(spec, tmp_path)
    assert lab.prepare(spec).plan.in_sync


def test_a_file_of_the_right_size_whose_sha256_differs_is_copied_again_and_hashes_are_cached(tmp_path: Path) -> None:
    state = tmp_path / "state"
    lab = Lab({NODE_SOURCE: 5678})
    spec = spec_of(NODE_SOURCE, node=True, sha256=SHA)
    lab.box.calls.clear()
    lab.apply(spec, state)
    assert calls(lab.box, "hash_files") == ["models"]  # hashed once after the copy, kept after the apply …
    assert list(read_sha256_cache(state).values()) == [SHA]
    lab.box.calls.clear()
    assert lab.prepare(spec, state).plan.in_sync
    assert calls(lab.box, "hash_files") == []  # … then read from the cache in the state directory
    # the same size, other bytes (written again: a new mtime)
    lab.box.hashes["models", "chat.gguf"] = "cd" * 32
    lab.box.mtimes["models", "chat.gguf"] += 1
    plan = lab.prepare(spec, state).plan
    assert "  -/+ file models/chat.gguf  (damaged: sha256 differs: copy it again from /srv/models/chat.gguf)\n" in (
        render_text(plan)
    )
    lab.apply(spec, state)
    assert lab.prepare(spec, state).plan.in_sync


def test_a_file_of_the_wrong_size_is_not_hashed(tmp_path: Path) -> None:
    lab = Lab({NODE_SOURCE: 5678})
    spec = spec_of(NODE_SOURCE, node=True, sha256=SHA)
    lab.apply(spec, tmp_path)
    lab.box.volumes["models"]["chat.gguf"] = 10
    lab.box.calls.clear()
    assert "damaged: size 10 of 5678 bytes" in render_text(lab.prepare(spec, tmp_path).plan)
    assert calls(lab.box, "hash_files") == []


def test_a_bad_sha256_cache_counts_as_empty(tmp_path: Path) -> None:
    for text in ("{", "[]", '{"files": 5}', '{"files": [[1, 2, 3, 4, 5, 6]]}', '{"files": [["a","b","c",1,2,"zz"]]}'):
        (tmp_path / SHA256_CACHE_FILE).write_text(text)
        assert read_sha256_cache(tmp_path) == {}
    good = ["box", "models", "chat.gguf", 5678, 3, SHA]
    (tmp_path / SHA256_CACHE_FILE).write_text(json.dumps({"files": [good, [*good[:3], 1e999, 3, SHA]]}))
    assert read_sha256_cache(tmp_path) == {("box", "models", "chat.gguf", 5678, 3): SHA}


def test_file_damage() -> None:
    want = FileState("box", "models", "m.gguf", size=5678, sha256=SHA.upper(), source="/srv/m.gguf")
    assert file_damage(want, FileState("box", "models", "m.gguf", size=1234)) == "size 1234 of 5678 bytes"
    assert file_damage(want, FileState("box", "models", "m.gguf", size=5678, sha256="cd" * 32)) == "sha256 differs"
    assert file_damage(want, FileState("box", "models", "m.gguf", size=5678, sha256=SHA)) is None
    assert file_damage(want, FileState("box", "models", "m.gguf", size=5678)) is None  # not hashed: nothing says
    unknown = FileState("box", "models", "m.gguf", source="/srv/m.gguf")
    assert file_damage(unknown, FileState("box", "models", "m.gguf", size=1)) is None


def test_an_apply_first_removes_orphaned_and_finished_helpers(tmp_path: Path) -> None:
    lab = Lab({NODE_SOURCE: 5678})
    spec = spec_of(NODE_SOURCE, node=True)
    helper = {LABEL_CLUSTER: "lab", LABEL_ROLE: "helper"}
    lab.box.helpers = {
        # a killed apply's copy, still writing its partial file
        "homelab-helper-orphan": ("running", {**helper, LABEL_WRITES: "models/chat.gguf"}),
        "homelab-helper-done": ("exited", dict(helper)),
        "homelab-helper-reading": ("running", dict(helper)),  # a `status` listing a volume: left alone
    }
    lab.box.volumes["models"] = {".chat.gguf.0123456789ab.partial": 77}
    lab.apply(spec, tmp_path)
    methods = [m for m, _ in lab.box.calls]
    assert methods.count("clean_helpers") == 1
    assert methods.index("clean_helpers") < methods.index("copy_file")  # before the apply's first step
    assert set(lab.box.helpers) == {"homelab-helper-reading"}
    assert lab.box.volumes["models"] == {"chat.gguf": 5678}  # the orphan's partial copy is gone
    events = [json.loads(line) for line in (tmp_path / EVENTS_FILE).read_text().splitlines()]
    removed = [e for e in events if e["event"] == "helpers-removed"]
    assert [(e["node"], e["containers"]) for e in removed] == [
        ("box", ["homelab-helper-done", "homelab-helper-orphan"])
    ]


def test_a_copy_stops_a_helper_still_writing_its_file(tmp_path: Path) -> None:
    lab = Lab({NODE_SOURCE: 5678})
    lab.box.volumes["models"] = {}
    lab.box.helpers = {"homelab-helper-orphan": ("running", {LABEL_CLUSTER: "lab", LABEL_WRITES: "models/chat.gguf"})}
    lab.box.copy_file("models", NODE_SOURCE, "chat.gguf")
    assert lab.box.helpers == {} and lab.box.volumes["models"] == {"chat.gguf": 5678}
