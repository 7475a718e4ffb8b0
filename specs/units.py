"""Sizes and durations written the way people write them.

`24GiB`, `9.0 GB`, `512MiB`, `1.5T` become integer bytes; `30s`, `2m`, `1h30m`,
`250ms` become float seconds. A bare number is bytes or seconds. Decimal
prefixes (kB, MB, GB, TB) are powers of 1000, binary prefixes (KiB, MiB, GiB,
TiB) powers of 1024, and a single letter (K, M, G, T) is binary, as in
`docker run --memory 4g` and Kubernetes' `Gi`.
"""

from __future__ import annotations

import math
import re

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_SIZE_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[A-Za-z]*)\s*$")

_DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_PLAIN_NUMBER_RE = re.compile(r"^(\d+(\.\d*)?|\.\d+)$")
_DURATION_PART_RE = re.compile(r"(?P<num>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h|d)")

SIZE_HINT = "use e.g. 24GiB, 9.0 GB or 512MiB"

MAX_SIZE = 1 << 50
"""1 PiB: more than any GPU, node or model of a homelab has, and small enough that sums of sizes
(in the solver's 64 KiB units) stay far inside the 64-bit integers OR-Tools works with."""
MAX_DURATION = 365 * 86400.0
"""A year: longer timeouts and intervals are mistakes, and far longer ones overflow `asyncio` and
`threading` timeouts."""
_TOO_BIG = "must be at most 1 PiB"
_TOO_LONG = "must be at most a year (8760h)"
_MAX_DIGITS = 30
"""More digits than any size or duration has; a longer number is refused before it is converted."""
DURATION_HINT = "use e.g. 30s, 2m, 1h30m or 250ms"


def parse_size(value: object) -> int:
    """Return the number of bytes that `value` stands for.

    Raises ValueError with a message fit to show a user.
    """
    if isinstance(value, bool):
        raise ValueError(f"must be a size, not a boolean ({SIZE_HINT})")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return _bounded_size(value)
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError("must be a finite size that is not negative")
        return _bounded_size(value)
    if not isinstance(value, str):
        raise ValueError(f"must be a size ({SIZE_HINT})")
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"must not be negative (got {value!r})")
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"is not a size: {value!r} ({SIZE_HINT})")
    unit = match["unit"].lower()
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit {match['unit']!r} in {value!r} ({SIZE_HINT})")
    if len(match["num"]) > _MAX_DIGITS:
        raise ValueError(f"{_TOO_BIG} (got a {len(match['num'])}-digit number)")
    return _bounded_size(round(float(match["num"]) * _SIZE_UNITS[unit]))


def _bounded_size(value: int | float) -> int:
    if value > MAX_SIZE:
        raise ValueError(_TOO_BIG)
    return int(value)


def parse_duration(value: object) -> float:
    """Return the number of seconds that `value` stands for.

    Raises ValueError with a message fit to show a user.
    """
    if isinstance(value, bool):
        raise ValueError(f"must be a duration, not a boolean ({DURATION_HINT})")
    if isinstance(value, (int, float)):
        if isinstance(value, int) and value > MAX_DURATION:
            raise ValueError(_TOO_LONG)
        if not math.isfinite(value) or value < 0:
            raise ValueError("must be a finite duration that is not negative")
        return _bounded_duration(float(value))
    if not isinstance(value, str):
        raise ValueError(f"must be a duration ({DURATION_HINT})")
    text = value.strip().lower().replace(" ", "")
    if text.startswith("-"):
        raise ValueError(f"must not be negative (got {value!r})")
    if not text:
        raise ValueError(f"must be a duration ({DURATION_HINT})")
    if len(text) > 64:
        raise ValueError(f"is not a duration ({DURATION_HINT})")
    if _PLAIN_NUMBER_RE.match(text):
        # Only digits: float() alone would also take "nan", "inf" and "1e400".
        return _bounded_duration(float(text))
    total = 0.0
    pos = 0
    for match in _DURATION_PART_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match["num"]) * _DURATION_UNITS[match["unit"]]
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"is not a duration: {value!r} ({DURATION_HINT})")
    return _bounded_duration(total)


def _bounded_duration(seconds: float) -> float:
    if not seconds <= MAX_DURATION:
        raise ValueError(_TOO_LONG)
    return seconds


def format_size(n_bytes: int) -> str:
    """Format bytes for people: binary units, one decimal (`9.0 GiB`, `512.0 MiB`)."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - loop always returns


def format_duration(seconds: float) -> str:
    """Format seconds the way the spec writes them (`30s`, `2m`, `1h30m`, `250ms`)."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if secs or not parts:
        parts.append(f"{secs}s")
    return "".join(parts)
