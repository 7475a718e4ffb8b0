from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from specs.units import MAX_SIZE, format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * 1024**3),
        ("9.0 GB", 9_000_000_000),
        ("512MiB", 512 * 1024**2),
        ("512 mib", 512 * 1024**2),
        ("1.5T", int(1.5 * 1024**4)),
        ("4g", 4 * 1024**3),
        ("16Gi", 16 * 1024**3),
        ("100kB", 100_000),
        ("100", 100),
        ("0", 0),
        (".5GiB", 512 * 1024**2),
        (4096, 4096),
        (1.5, 1),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("-4GiB", "must not be negative"),
        (-1, "must not be negative"),
        ("24XB", "unknown size unit 'XB'"),
        ("lots", "is not a size"),
        ("", "is not a size"),
        (True, "not a boolean"),
        ([1], "must be a size"),
        (float("nan"), "finite"),
    ],
)
def test_parse_size_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_size(value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", 30.0),
        ("2m", 120.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("1d", 86400.0),
        ("10", 10.0),
        (5, 5.0),
        (0.5, 0.5),
        ("2m 30s", 150.0),
    ],
)
def test_parse_duration(text: object, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("-5s", "must not be negative"),
        ("5 parsecs", "is not a duration"),
        ("s", "is not a duration"),
        ("30s5", "is not a duration"),
        ("", "must be a duration"),
        (False, "not a boolean"),
        (-1, "not negative"),
    ],
)
def test_parse_duration_rejects(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_duration(value)


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(512 * 1024**2) == "512.0 MiB"
    assert format_size(9 * 1024**3 + 512 * 1024**2) == "9.5 GiB"
    assert format_size(3 * 1024**4) == "3072.0 GiB"


@given(st.integers(min_value=0, max_value=10**7))
def test_format_duration_round_trips(seconds: int) -> None:
    assert parse_duration(format_duration(float(seconds))) == seconds


@given(st.integers(min_value=0, max_value=2**50), st.sampled_from(["B", "KiB", "MiB", "GiB", "TiB"]))
def test_binary_units_are_exact(n: int, unit: str) -> None:
    factor = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}[unit]
    if n * factor > MAX_SIZE:
        with pytest.raises(ValueError, match="at most 1 PiB"):
            parse_size(f"{n}{unit}")
    elif n * factor < 2**53:  # exact in a float
        assert parse_size(f"{n}{unit}") == n * factor
