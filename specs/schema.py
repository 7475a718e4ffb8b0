"""JSON Schema of the spec, for editors (yaml-language-server) and other tools."""

from __future__ import annotations

import json
from typing import Any

from specs.model import ClusterSpec


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that a cluster.yaml must satisfy."""
    schema = ClusterSpec.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "homelab cluster spec"
    return schema


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
