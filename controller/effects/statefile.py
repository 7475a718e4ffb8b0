"""Reading homelab's own state files (watch.json, power.json, measured.json, recovery.json, events.jsonl)
as untrusted input.

Another process, a full disk, a hand edit or an attacker with write access to the state directory may
leave anything there; Python's `json` accepts NaN, Infinity, 1e999 and 400-digit integers, which crashed
`status`, `wake`, `place` and `reconcile` and made `/api/status` emit `Infinity`. So each reader parses
with `specs.jsontext.loads` and checks the shape it needs (`check`, against a small `Shape`); a file that
fails is reported once (one line on stderr naming it), set aside as NAME.corrupt-TIMESTAMP (so it is
reported once, and kept for whoever wants to look) and read as absent. Never fatal.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from specs.jsontext import loads

MAX_STATE_BYTES = 64 << 20
"""A state file larger than this is not one homelab wrote."""


class Time:
    """A shape: epoch seconds (a finite number from 0 to year 5000)."""


class Number:
    """A shape: a finite int or float (not a bool) of at most 1e15 in size."""


Shape = type | Time | Number | dict[str, Any] | list[Any] | tuple[Any, ...]
"""`str`, `int`, `bool`, `object` (anything); `TIME`, `NUMBER`; {key: shape} (an object whose given keys have
those shapes; "*" for every key); [shape] (a list of it); (shape, shape) (either). None is always allowed."""
TIME = Time()
NUMBER = Number()
MAX_TIME = 95_617_584_000.0  # 5000-01-01


def check(value: Any, shape: Any, where: str = "") -> None:
    """ValueError (naming `where`, the key path) unless `value` has `shape` (see `Shape`)."""
    at = where or "the top level"
    if value is None or shape is object:
        return
    if isinstance(shape, tuple):
        errors = []
        for option in shape:
            try:
                check(value, option, where)
                return
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0])
    if isinstance(shape, Time | Number):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{at}: not a number")
        limit_ok = 0 <= value <= MAX_TIME if isinstance(shape, Time) else abs(value) <= 1e15
        if not math.isfinite(value) or not limit_ok:
            raise ValueError(f"{at}: {str(value)[:30]} is out of range")
        return
    if isinstance(shape, list):
        if not isinstance(value, list):
            raise ValueError(f"{at}: not a list")
        for i, item in enumerate(value):
            check(item, shape[0], f"{where}[{i}]")
        return
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{at}: not an object")
        for key, item in value.items():
            sub = shape.get(key, shape.get("*"))
            if sub is not None:
                check(item, sub, f"{where}.{key}" if where else str(key))
        return
    if shape is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{at}: not a whole number")
    if not isinstance(value, shape):
        raise ValueError(f"{at}: not {'text' if shape is str else 'a ' + shape.__name__}")


def report(line: str) -> None:
    """One line on stderr (the commands' and the watch service's log)."""
    print(f"warning: {line}", file=sys.stderr, flush=True)


def set_aside(path: Path, why: str, warn: Callable[[str], None] = report) -> None:
    """Rename a bad state file to NAME.corrupt-TIMESTAMP and say so in one line."""
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    try:
        path.rename(target)
        kept = f"set aside as {target.name}"
    except OSError as exc:
        kept = f"could not be set aside ({exc.strerror}); ignored"
    warn(f"{path}: not a state file homelab can read ({why[:200]}); {kept}")


def read_json(path: Path, shape: Any, warn: Callable[[str], None] = report) -> Any:
    """The JSON in `path` if it has `shape`; None when it is missing, and (reported, set aside) when bad."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_STATE_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        warn(f"{path}: cannot read ({exc.strerror}); ignored")
        return None
    try:
        if len(raw) > MAX_STATE_BYTES:
            raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
        data = loads(raw)
        check(data, shape)
    except ValueError as exc:
        set_aside(path, str(exc), warn)
        return None
    return data


def good_line(line: str, shape: Mapping[str, Any]) -> dict[str, Any] | None:
    """One line of a JSON-lines file (events.jsonl) if it is an object of `shape`; else None (skipped)."""
    try:
        record = loads(line)
        check(record, shape)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
