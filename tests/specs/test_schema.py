"""`homelab schema` prints a JSON Schema that validates the examples and rejects bad specs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from typer.testing import CliRunner

from controller.cli import app
from specs import read_document
from specs.load import to_plain
from specs.schema import json_schema_text


def _schema() -> dict[str, Any]:
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    schema: dict[str, Any] = json.loads(result.stdout)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


@pytest.mark.parametrize("name", ["homelab.yaml", "minimal.yaml"])
def test_schema_validates_examples(examples_dir: Path, name: str) -> None:
    data = to_plain(read_document(examples_dir / name).data)
    jsonschema.validate(data, _schema(), cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["cluster"].update(colour="red"),
        lambda d: d["nodes"][0].update(tier="gpu"),
        lambda d: d["nodes"][0].update(ram="24 bananas"),
        lambda d: d["models"][0].update(context=-1),
        lambda d: d.update(secrets={"k": "hunter2"}),
    ],
    ids=["unknown-key", "bad-enum", "bad-size", "negative-context", "literal-secret"],
)
def test_schema_rejects_bad_specs(examples_dir: Path, mutate: Any) -> None:
    data = to_plain(read_document(examples_dir / "minimal.yaml").data)
    mutate(data)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, _schema(), cls=jsonschema.Draft202012Validator)


def test_examples_start_with_the_schema_comment(examples_dir: Path) -> None:
    for name in ("homelab.yaml", "minimal.yaml"):
        first = (examples_dir / name).read_text().splitlines()[0]
        assert first == "# yaml-language-server: $schema=./homelab.schema.json"


def test_committed_schema_is_current(examples_dir: Path) -> None:
    """examples/homelab.schema.json is what editors load: regenerate it with `homelab schema -o`."""
    assert (examples_dir / "homelab.schema.json").read_text() == json_schema_text()


def test_schema_output_file(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    result = CliRunner().invoke(app, ["schema", "-o", str(out)])
    assert result.exit_code == 0
    assert json.loads(out.read_text())["title"] == "homelab cluster spec"
