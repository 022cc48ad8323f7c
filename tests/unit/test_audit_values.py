"""JSON-safe encoding of audit values and the retention duration syntax."""

from __future__ import annotations

import enum
import ipaddress
import json
import uuid
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from orchestrator_data.audit.jsonsafe import json_safe
from orchestrator_data.durations import parse_duration
from orchestrator_data.errors import ValidationError


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


def test_json_safe_encodes_python_values_as_json() -> None:
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    value = {
        "id": ident,
        "at": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc),
        "day": date(2026, 1, 2),
        "price": Decimal("0.10"),
        "color": Color.RED,
        "level": Level.HIGH,
        "ip": ipaddress.ip_address("10.0.0.1"),
        "wait": timedelta(minutes=1, milliseconds=500),
        "raw": b"\x00\xff",
        "tags": ("a", 1),
        "set": {"b", "a"},
        "nan": float("nan"),
        "nested": [{"id": ident}],
        3: None,
    }
    out = json_safe(value)
    assert out == {
        "id": "12345678-1234-5678-1234-567812345678",
        "at": "2026-01-02T03:04:05.000006+00:00",
        "day": "2026-01-02",
        "price": "0.10",
        "color": "red",
        "level": 3,
        "ip": "10.0.0.1",
        "wait": 60.5,
        "raw": "AP8=",
        "tags": ["a", 1],
        "set": ["a", "b"],
        "nan": "nan",
        "nested": [{"id": "12345678-1234-5678-1234-567812345678"}],
        "3": None,
    }
    json.dumps(out, allow_nan=False)  # strictly JSON


def test_json_safe_refuses_unknown_objects() -> None:
    with pytest.raises(TypeError, match="object"):
        json_safe(object())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90d", timedelta(days=90)),
        ("12h", timedelta(hours=12)),
        ("30m", timedelta(minutes=30)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        (" 7 d ", timedelta(days=7)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["0d", "0s", "00h"])
def test_parse_duration_says_a_zero_duration_must_be_positive(text: str) -> None:
    with pytest.raises(ValidationError, match="must be positive") as err:
        parse_duration(text)
    assert err.value.fields == ["older_than"]


def test_parse_duration_refuses_a_duration_past_the_calendar() -> None:
    with pytest.raises(ValidationError, match="too long"):
        parse_duration("99999999999d")


@pytest.mark.parametrize("text", ["", "90", "d", "-1d", "1.5h", "90 days", "90D"])
def test_parse_duration_refuses_bad_input(text: str) -> None:
    with pytest.raises(ValidationError, match="not a duration like 90d"):
        parse_duration(text)


def test_audit_encoding_takes_what_json_alone_refuses() -> None:
    from orchestrator_data.audit.trail import _dumps

    ident = uuid.UUID(int=1)
    assert json.loads(_dumps({"id": ident, "n": float("nan"), ident: Decimal("1.5")})) == {
        "id": str(ident),
        "n": "nan",
        str(ident): "1.5",
    }
    assert json.loads(_dumps({"at": date(2026, 1, 2), "c": Color.RED})) == {
        "at": "2026-01-02",
        "c": "red",
    }
