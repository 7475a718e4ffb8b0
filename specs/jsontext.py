"""JSON from outside homelab (a node's answer, a state file): parsed as untrusted text.

Python's `json` accepts `NaN`, `Infinity`, `1e999` (read as inf) and integers of hundreds of digits;
none of them is JSON another program can read back, and each one has crashed or hung a reader that
did arithmetic on it. `loads` refuses them all with a ValueError whose message is one line.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_INT_DIGITS = 30
"""An integer longer than this is refused: no count, size or time homelab reads is near 10**30."""


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits is out of range")
    return int(text)


def loads(text: str | bytes) -> Any:
    """Parse JSON, refusing NaN, ±Infinity, non-finite floats and huge integers (ValueError, one line)."""
    try:
        return json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def finite_number(value: object) -> float | None:
    """`value` as a float when it is a finite int or float (not a bool); else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
