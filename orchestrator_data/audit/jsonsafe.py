"""JSON-safe encoding of column values for the audit trail (JSONB)."""

from __future__ import annotations

import base64
import enum
import ipaddress
import math
import uuid
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` made of JSON types only: UUIDs, dates and times as strings
    (ISO 8601), Decimals as strings (exact: a float would round), enums as
    their value, NaN and infinities as strings, timedeltas as seconds, bytes
    as base64; containers recursively."""
    # Enums first: a str or int Enum would otherwise pass as its base type.
    if isinstance(value, enum.Enum):
        return json_safe(value.value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSONB has no NaN or Infinity
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [json_safe(v) for v in items]
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, Decimal, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"cannot record a {type(value).__name__} in the audit trail")
