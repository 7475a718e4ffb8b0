"""specs: the desired-state language of a homelab cluster (want).

from specs import load_spec, SpecError
loaded = load_spec("cluster.yaml")      # raises SpecError with located diagnostics
loaded.spec.models[0].context
"""

from specs.errors import Diagnostic, Severity, SpecError, format_path
from specs.load import (
    LoadedSpec,
    SpecDocument,
    dump_document,
    load_spec,
    parse_document,
    parse_spec,
    read_document,
    save_document,
)
from specs.model import ClusterSpec

__all__ = [
    "ClusterSpec",
    "Diagnostic",
    "LoadedSpec",
    "Severity",
    "SpecDocument",
    "SpecError",
    "dump_document",
    "format_path",
    "load_spec",
    "parse_document",
    "parse_spec",
    "read_document",
    "save_document",
]
