"""Loading and saving a spec without changes gives back the same text; edits keep the rest intact."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from specs import dump_document, parse_document, read_document, save_document

STYLES = {
    "two-space-indented-sequences": """\
# a comment at the top
cluster:
  name: lab   # trailing comment

nodes:
  - name: a    # the first node
    tier: local
    address: 127.0.0.1
    gpus:
      - {index: 0, name: "RTX 4090", vram: 24GiB}
    ram: 32GiB
    ollama:
      url: 'http://127.0.0.1:11434'
""",
    "four-space-zero-offset": """\
cluster:
    name: lab
nodes:
-   name: a
    tier: local
    address: 127.0.0.1
    ram: 32GiB
    ollama:
        url: http://127.0.0.1:11434
""",
    "unindented-sequences": """\
cluster:
  name: lab
nodes:
- name: a
  tier: local
  address: 127.0.0.1
  ram: 32GiB  # plenty
  ollama:
    url: http://127.0.0.1:11434
models: []
""",
    "document-markers-and-block-scalars": """\
---
# header comment
cluster:
  name: lab
nodes:
  - name: a
    tier: cpu
    address: 127.0.0.1
    ram: 8GiB
    wake:
      command: >-
        ipmitool -H 10.0.0.9
        power on
    ollama: {url: "http://127.0.0.1:11434"}
routing:
  rules:
    code:
      patterns:
        - '^\\s*def '
        - "import \\\\w+"

# trailing comment at the end
""",
}


@pytest.mark.parametrize("text", list(STYLES.values()), ids=list(STYLES))
def test_round_trip_is_identical(text: str) -> None:
    assert dump_document(parse_document(text, "x.yaml")) == text


@pytest.mark.parametrize("name", ["homelab.yaml", "minimal.yaml", "lab/cluster.yaml"])
def test_examples_round_trip(examples_dir: Path, name: str) -> None:
    doc = read_document(examples_dir / name)
    assert dump_document(doc) == (examples_dir / name).read_text()


def test_edit_changes_only_the_edited_value(examples_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    original = (examples_dir / "homelab.yaml").read_text()
    path.write_text(original)
    doc = read_document(path)
    doc.data["nodes"][0]["gpus"][0]["vram"] = "23.5GiB"
    backup = save_document(doc)
    new = path.read_text()
    old_lines, new_lines = original.splitlines(), new.splitlines()
    changed = [(a, b) for a, b in zip(old_lines, new_lines, strict=True) if a != b]
    assert changed == [("        vram: 24GiB", "        vram: 23.5GiB")]
    assert backup is not None and backup.read_text() == original


def test_save_is_atomic_and_keeps_mode(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(STYLES["unindented-sequences"])
    os.chmod(path, 0o600)
    doc = read_document(path)
    doc.data["cluster"]["name"] = "lab2"
    save_document(doc)
    assert "name: lab2" in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (tmp_path / "cluster.yaml.bak").read_text() == STYLES["unindented-sequences"]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_failed_write_leaves_the_file_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from specs import files

    path = tmp_path / "cluster.yaml"
    path.write_text("cluster: {name: a}\n")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("specs.files.os.replace", broken_replace)
    with pytest.raises(OSError):
        files.atomic_write(path, "cluster: {name: b}\n")
    assert path.read_text() == "cluster: {name: a}\n"
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
