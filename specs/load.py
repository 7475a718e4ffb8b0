"""YAML in and out: round-trip loading that keeps comments, and errors located in the file.

`load_spec(path)` is the one entry point most code needs: it returns a
validated `LoadedSpec` or raises `SpecError` carrying every problem found,
each as `file:line:col: path: message`. `SpecDocument` keeps the ruamel.yaml
round-trip tree so that a later edit (`homelab discover --write`) can change a
few keys and save the file with comments, key order and formatting intact.
"""

from __future__ import annotations

import difflib
import io
import itertools
import os
import re
import stat
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer, ComposerError
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent

from specs.errors import Diagnostic, PathPart, Severity, SpecError
from specs.errors import Path as DocPath
from specs.files import atomic_write
from specs.model import PATTERN_MESSAGES, ClusterSpec
from specs.validate import check_references

SENSITIVE_KEYS = frozenset({"secrets", "master_key", "sudo_password", "password", "token", "api_key", "stdin"})

MAX_SPEC_BYTES = 128 * 1024
"""The largest spec file read. A homelab spec is a few KiB (examples/homelab.yaml: 7 KiB); 128 KiB
holds some 1,000 models. ruamel.yaml's round-trip parser is pure Python (about 5 µs a byte, 40 µs a
node on the CI machine), so this also keeps the slowest file it will parse well under a second; a
larger file is refused unread."""
MAX_YAML_NODES = 25_000
"""The most YAML nodes a spec may expand to, an alias counted as a copy of what it names: a
1,000-model spec has about 17,000. Bounds the work of a small file with nested aliases (a "billion
laughs") or of a long flow list of tiny values to about a second."""
MAX_YAML_DEPTH = 32
"""The deepest nesting of mappings and lists; the spec itself goes 6 deep."""


@dataclass
class SpecDocument:
    """A spec file as YAML: the round-trip tree plus what is needed to write it back unchanged."""

    path: Path
    text: str
    data: Any
    mapping_indent: int = 2
    sequence_indent: int = 4
    sequence_offset: int = 2
    explicit_start: bool = False

    @property
    def display_name(self) -> str:
        return str(self.path)

    def locate(self, path: Sequence[PathPart], *, at_key: bool = False) -> tuple[int, int, DocPath]:
        """Line and column (1-based) of `path` in the file, and how much of `path` exists.

        Walks as far into the tree as `path` goes; a missing tail (a key that is
        absent) resolves to the deepest existing node. With `at_key`, a mapping
        entry resolves to its key instead of its value.
        """
        return _locate(self.data, path, at_key=at_key)


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec, the document it came from, and any warnings."""

    spec: ClusterSpec
    document: SpecDocument
    warnings: tuple[Diagnostic, ...] = field(default=())


# --------------------------------------------------------------------------- reading


class _BoundedComposer(Composer):
    """ruamel.yaml's composer with limits: nesting depth, and the number of nodes the document
    expands to (each alias counted as a copy of the subtree it names). A recursive alias (a node
    that contains an alias of itself) is refused too: nothing downstream could expand it."""

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self._expanded = 0
        self._sizes: dict[int, int] = {}

    def compose_document(self) -> Any:
        self._expanded = 0
        self._sizes = {}
        return super().compose_document()

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        if self.depth >= MAX_YAML_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
        start = self._expanded
        node = super().compose_node(parent, index)
        if isinstance(event, AliasEvent):
            size = self._sizes.get(id(node))
            if size is None:
                raise ComposerError(
                    None, None, f"alias *{event.anchor} is used inside the node it names", event.start_mark
                )
            self._expanded += size
        else:
            self._expanded += 1
            if getattr(node, "anchor", None) is not None:
                self._sizes[id(node)] = self._expanded - start
        if self._expanded > MAX_YAML_NODES:
            raise ComposerError(
                None,
                None,
                f"the document expands to more than {MAX_YAML_NODES} values (aliases counted as copies)",
                event.start_mark,
            )
        return node


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.Composer = _BoundedComposer
    return yaml


def read_document(path: str | Path, what: str = "spec") -> SpecDocument:
    """Read and parse a YAML file, keeping comments; raise SpecError on I/O or syntax errors.

    Only a regular file of at most MAX_SPEC_BYTES is read: a FIFO, a device (/dev/zero), a socket
    or a directory is refused after a stat, before it is opened, and the file is opened without
    blocking, so that a FIFO swapped in between cannot hang the reader either. `what` names the kind of
    file in the messages (`homelab import` reads LiteLLM and llama-swap configs with the same limits).
    """
    path = Path(path)
    name = str(path)

    def fail(message: str) -> SpecError:
        return SpecError([Diagnostic(name, 0, 0, (), message)])

    try:
        _check_regular(os.stat(path), fail, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        try:
            _check_regular(os.fstat(fd), fail, what)
            with os.fdopen(fd, "rb", closefd=False) as handle:
                raw = handle.read(MAX_SPEC_BYTES + 1)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise fail("no such file") from None
    except IsADirectoryError:
        raise fail(f"is a directory, not a {what} file") from None
    except ValueError:  # a NUL byte in the path
        raise fail("not a valid file name") from None
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise fail(f"is larger than {MAX_SPEC_BYTES // 1024} KiB; a {what} is a few KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError([Diagnostic(name, line, 1, (), "not UTF-8 text")]) from None
    return parse_document(text, path, what)


def _check_regular(st: os.stat_result, fail: typing.Callable[[str], SpecError], what: str) -> None:
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        raise fail(f"is a directory, not a {what} file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else None
        raise fail(f"is {kind}, not a {what} file" if kind else "is not a regular file")
    if st.st_size > MAX_SPEC_BYTES:
        raise fail(f"is larger than {MAX_SPEC_BYTES // 1024} KiB ({st.st_size} bytes); a {what} is a few KiB")


def parse_document(text: str, path: str | Path = "<string>", what: str = "spec") -> SpecDocument:
    """Parse YAML text into a round-trip document; raise SpecError on syntax errors."""
    path = Path(path)
    name = str(path)
    if text.startswith("\ufeff"):
        text = text[1:]
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise SpecError(
            [Diagnostic(name, 0, 0, (), f"is larger than {MAX_SPEC_BYTES // 1024} KiB; a {what} is a few KiB")]
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ruamel warns on stderr of a reused anchor
            data = _yaml().load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        col = mark.column + 1 if mark is not None else 0
        problem = exc.problem or exc.context or "invalid YAML"
        if "duplicate key" in str(problem):
            problem = _duplicate_key_message(exc)
        raise SpecError([Diagnostic(name, line, col, (), f"YAML syntax error: {problem}")]) from None
    except YAMLError as exc:
        raise SpecError([Diagnostic(name, 0, 0, (), f"YAML error: {_one_line(str(exc))}")]) from None
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError, RecursionError) as exc:
        # ruamel.yaml lets some odd input through as plain Python errors (e.g. an integer literal of
        # more than 4,300 digits): still one line, never a traceback.
        raise SpecError(
            [Diagnostic(name, 0, 0, (), f"YAML error: {_one_line(str(exc)) or type(exc).__name__}")]
        ) from None
    bad_key = _first_complex_key(data)
    if bad_key is not None:
        line, col = bad_key
        raise SpecError([Diagnostic(name, line, col, (), "a mapping key must be a plain value, not a list or mapping")])
    mapping, sequence, offset = guess_indent(text)
    return SpecDocument(
        path=path,
        text=text,
        data=data,
        mapping_indent=mapping,
        sequence_indent=sequence,
        sequence_offset=offset,
        explicit_start=_has_document_start(text),
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def _first_complex_key(root: Any) -> tuple[int, int] | None:
    """Where the first mapping key that is a list or a mapping (`? [a, b]: x`) is, if any."""
    stack = [root]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, CommentedMap):
            for key, value in node.items():
                if isinstance(key, (tuple, list, Mapping, set, frozenset)):
                    return _pos(node.lc.key(key))
                stack.append(value)
        elif isinstance(node, CommentedSeq):
            stack.extend(node)
    return None


_KEY_ONLY = re.compile(r"^(?P<indent> *)(?:- +)*[^\s#][^#]*:\s*(#.*)?$")
_CONTENT = re.compile(r"^(?P<indent> *)(?P<dash>- +)?\S")


def guess_indent(text: str) -> tuple[int, int, int]:
    """The (mapping, sequence, offset) indentation a file is written with, as ruamel.yaml counts them.

    Found from the first block mapping nested in a mapping, and the first block
    sequence under a key; defaults are 2, 4, 2 (`key:` then `  - item`).
    """
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    mapping: int | None = None
    sequence: int | None = None
    offset: int | None = None
    for here, below in itertools.pairwise(lines):
        key = _KEY_ONLY.match(here)
        content = _CONTENT.match(below)
        if key is None or content is None:
            continue
        key_col = len(here) - len(here.lstrip(" -"))
        col = len(content["indent"])
        if content["dash"]:
            if offset is None and col >= key_col:
                offset = col - key_col
                sequence = col + len(content["dash"]) - key_col
        elif mapping is None and col > key_col:
            mapping = col - key_col
        if mapping is not None and offset is not None:
            break
    mapping = mapping or 2
    if offset is None or sequence is None:
        offset, sequence = 2, mapping + 2
    return mapping, max(sequence, offset + 2), offset


def _has_document_start(text: str) -> bool:
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        return stripped == "---" or stripped.startswith("--- ")
    return False


def _duplicate_key_message(exc: MarkedYAMLError) -> str:
    problem = str(exc.problem or "")
    # ruamel: 'found duplicate key "name" with value "x" (original value: "y")'
    if "found duplicate key" in problem:
        key = problem.split("found duplicate key", 1)[1].split(" with value", 1)[0].strip()
        return f"duplicate key {key}"
    return "duplicate key"


# --------------------------------------------------------------------------- writing


def dump_document(doc: SpecDocument) -> str:
    """The document as YAML text; unchanged data gives back the text it was read from."""
    yaml = _yaml()
    yaml.indent(mapping=doc.mapping_indent, sequence=doc.sequence_indent, offset=doc.sequence_offset)
    yaml.explicit_start = doc.explicit_start
    stream = io.StringIO()
    yaml.dump(doc.data, stream)
    out = stream.getvalue()
    if doc.data is None:
        return doc.text
    return out


def save_document(doc: SpecDocument, path: str | Path | None = None) -> Path | None:
    """Write the document atomically, keeping the previous file as NAME.bak."""
    return atomic_write(Path(path) if path is not None else doc.path, dump_document(doc))


# --------------------------------------------------------------------------- validating


def load_spec(path: str | Path) -> LoadedSpec:
    """Read, parse and validate a spec file. Raises SpecError with every error found."""
    return validate_document(read_document(path))


def parse_spec(text: str, path: str | Path = "<string>") -> LoadedSpec:
    """Parse and validate spec text (tests, stdin, git blobs)."""
    return validate_document(parse_document(text, path))


def validate_document(doc: SpecDocument) -> LoadedSpec:
    """Validate a parsed document: structure and types first, then cross-references."""
    name = doc.display_name
    if doc.data is None:
        raise SpecError([Diagnostic(name, 1, 1, (), "the file is empty; a spec needs `cluster` and `nodes`")])
    if not isinstance(doc.data, Mapping):
        line, col, _ = doc.locate(())
        raise SpecError(
            [Diagnostic(name, line, col, (), "the document must be a mapping with `cluster`, `nodes`, `models` …")]
        )
    plain = to_plain(doc.data)
    try:
        spec = ClusterSpec.model_validate(plain)
    except ValidationError as exc:
        raise SpecError(_diagnostics_from_pydantic(doc, exc.errors())) from None
    problems = check_references(spec)
    located = [
        Diagnostic(name, *doc.locate(p.path, at_key=p.at_key)[:2], p.path, p.message, p.severity) for p in problems
    ]
    located.sort(key=lambda d: (d.line, d.column))
    errors = [d for d in located if d.severity is Severity.ERROR]
    if errors:
        raise SpecError(errors)
    return LoadedSpec(spec=spec, document=doc, warnings=tuple(d for d in located if d.severity is Severity.WARNING))


def to_plain(node: Any) -> Any:
    """ruamel round-trip objects → plain dict / list / str / int / float / bool / None."""
    if isinstance(node, Mapping):
        return {to_plain(k): to_plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [to_plain(v) for v in node]
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    if isinstance(node, bytes):  # !!binary: validated as the text it would become
        return node.decode("utf-8", "replace")
    if isinstance(node, (set, frozenset)):  # !!set
        return [to_plain(v) for v in node]
    return node


# --------------------------------------------------------------------------- locations


def _locate(root: Any, path: Sequence[PathPart], *, at_key: bool) -> tuple[int, int, DocPath]:
    line, col = _node_position(root)
    node = root
    consumed: list[PathPart] = []
    parts = list(path)
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "[key]" and consumed and isinstance(prev_node := _parent(root, consumed), CommentedMap):
            key = consumed[-1]
            line, col = _pos(prev_node.lc.key(key))
            break
        if isinstance(node, CommentedMap):
            key = _find_key(node, part)
            if key is _MISSING:
                break
            if at_key and last:
                line, col = _pos(node.lc.key(key))
            else:
                line, col = _pos(node.lc.value(key))
            node = node[key]
            consumed.append(part)
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            line, col = _pos(node.lc.item(part))
            node = node[part]
            consumed.append(part)
        else:
            break
    return line, col, tuple(consumed)


_MISSING = object()


def _find_key(node: CommentedMap, part: PathPart) -> Any:
    if part in node:
        return part
    for key in node:
        if str(key) == str(part):
            return key
    return _MISSING


def _parent(root: Any, consumed: Sequence[PathPart]) -> Any:
    node = root
    for part in consumed[:-1]:
        node = node[_find_key(node, part)] if isinstance(node, CommentedMap) else node[part]
    return node


def _pos(pair: Any) -> tuple[int, int]:
    line, col = pair
    return int(line) + 1, int(col) + 1


def _node_position(node: Any) -> tuple[int, int]:
    lc = getattr(node, "lc", None)
    if lc is not None and lc.line is not None:
        return int(lc.line) + 1, int(lc.col) + 1
    return 1, 1


# --------------------------------------------------------------------------- pydantic errors → diagnostics


def _diagnostics_from_pydantic(doc: SpecDocument, errors: Sequence[ErrorDetails]) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    seen: set[tuple[int, int, str]] = set()
    # A misspelt key is both "unknown" and "missing": report it once, as the unknown key.
    suggested = {(_loc(err)[:-1], _suggestion(_loc(err))) for err in errors if err["type"] == "extra_forbidden"}
    for err in errors:
        loc = _loc(err)
        kind = err["type"]
        if kind == "missing" and (loc[:-1], str(loc[-1])) in suggested:
            continue
        if kind == "missing":
            line, col, _ = doc.locate(loc[:-1])
            path: DocPath = loc[:-1]
            message = f"missing required key '{loc[-1]}'"
        elif kind == "extra_forbidden":
            line, col, _ = doc.locate(loc, at_key=True)
            path = loc
            message = _unknown_key_message(loc)
        else:
            at_key = bool(loc) and loc[-1] == "[key]"
            path = tuple(p for p in loc if p != "[key]")
            message = _message(err, path)
            if kind == "value_error":
                path, message = _refine(doc, path, message)
            line, col, _ = doc.locate(path if not at_key else loc, at_key=at_key)
        key = (line, col, message)
        if key in seen:
            continue
        seen.add(key)
        out.append(Diagnostic(doc.display_name, line, col, path, message))
    out.sort(key=lambda d: (d.line, d.column))
    return out


_FIELD_PREFIX = re.compile(
    r"^(?P<field>[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)(?P<index>(\[\d+\])*): (?P<rest>.+)$", re.S
)


def _refine(doc: SpecDocument, path: DocPath, message: str) -> tuple[DocPath, str]:
    """A validator's `field: message` names the field at fault: point at it when it is in the file."""
    match = _FIELD_PREFIX.match(message)
    if match is None:
        return path, message
    # `field`, `field[2]` or a nested `field.key` (e.g. placement.split).
    extra: list[PathPart] = [*match["field"].split("."), *(int(i) for i in re.findall(r"\d+", match["index"]))]
    candidate = (*path, *extra)
    _, _, found = doc.locate(candidate)
    if len(found) == len(candidate):
        return candidate, match["rest"]
    return path, message


def _sensitive(path: Sequence[PathPart]) -> bool:
    return any(isinstance(p, str) and p in SENSITIVE_KEYS for p in path)


def _describe(value: Any, path: Sequence[PathPart]) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (int, float)):
        if _sensitive(path):
            return "a number"
        return repr(value) if abs(value) < 10**15 or isinstance(value, float) else f"a {len(str(value))}-digit number"
    if isinstance(value, str):
        if _sensitive(path):
            return "a string"
        return repr(value if len(value) <= 40 else value[:37] + "...")
    return type(value).__name__


_TYPE_MESSAGES = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping (key: value)",
    "model_type": "must be a mapping (key: value)",
    "model_attributes_type": "must be a mapping (key: value)",
    "finite_number": "must be a finite number",
}


def _message(err: ErrorDetails, path: Sequence[PathPart]) -> str:
    kind = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    value = err.get("input")
    got = f" (got {_describe(value, path)})"
    if kind in _TYPE_MESSAGES:
        return _TYPE_MESSAGES[kind] + got
    if kind == "greater_than":
        return f"must be greater than {ctx['gt']}{got}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}{got}"
    if kind == "less_than":
        return f"must be less than {ctx['lt']}{got}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}{got}"
    if kind == "enum":
        return f"must be one of {ctx['expected']}{got}"
    if kind == "literal_error":
        return f"must be {ctx['expected']}{got}"
    if kind == "string_pattern_mismatch":
        friendly = PATTERN_MESSAGES.get(str(ctx.get("pattern")))
        if friendly is not None:
            return friendly + got
        return f"must match the pattern {ctx.get('pattern')}{got}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters long"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return f"must have at least {n} item{'s' if n != 1 else ''}"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items"
    if kind in ("value_error", "assertion_error"):
        error = ctx.get("error")
        text = str(error) if error is not None else err["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            text = text.removeprefix(prefix)
        return text
    msg = err["msg"]
    return msg[:1].lower() + msg[1:]


def _loc(err: ErrorDetails) -> DocPath:
    return tuple(p for p in err["loc"] if isinstance(p, (str, int)))


def _suggestion(loc: Sequence[PathPart]) -> str | None:
    close = difflib.get_close_matches(str(loc[-1]), _allowed_keys(ClusterSpec, loc[:-1]), n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key_message(loc: Sequence[PathPart]) -> str:
    allowed = _allowed_keys(ClusterSpec, loc[:-1])
    if not allowed:
        return "unknown key"
    close = _suggestion(loc)
    if close:
        return f"unknown key (did you mean '{close}'?)"
    return "unknown key (expected one of: " + ", ".join(allowed) + ")"


def _allowed_keys(root: type[BaseModel], loc: Sequence[PathPart]) -> list[str]:
    """The field names of the model found by following `loc` through the type annotations."""
    annotation: Any = root
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            info = annotation.model_fields.get(str(part))
            if info is None:
                return []
            annotation = info.annotation
            continue
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin in (list, tuple) and args:
            annotation = args[0]
        elif origin is dict and len(args) == 2:
            annotation = args[1]
        else:
            return []
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return list(annotation.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and Optional[...] down to the one real type."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            real = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(real) == 1:
                annotation = real[0]
                continue
        return annotation


__all__ = [
    "LoadedSpec",
    "SpecDocument",
    "dump_document",
    "load_spec",
    "parse_document",
    "parse_spec",
    "read_document",
    "save_document",
    "to_plain",
    "validate_document",
]
