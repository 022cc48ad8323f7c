"""Payloads on the wire: the JSON codec of what pub/sub messages and stream
entries carry (:func:`encode_payload` when publishing or adding,
:func:`decode_payload` when receiving), its size limit, and :func:`as_text`
for Redis replies, which come as bytes.

JSON, never pickle: a reader in another process or language must not have to
trust the writer.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from typing import Any

from orchestrator_data.errors import ValidationError

#: Largest payload, in bytes of its JSON text (a stream entry or a pub/sub message).
MAX_PAYLOAD_BYTES = 1 << 20


def _json_default(value: object) -> object:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def encode_payload(payload: object) -> str:
    """The JSON text of ``payload`` (JSON values, plus UUIDs, datetimes and
    decimals as strings); :class:`ValidationError` on ``payload`` for anything
    else, NaN, or more than :data:`MAX_PAYLOAD_BYTES`. Never pickle: a reader
    in another process or language must not have to trust the writer."""
    try:
        text = json.dumps(payload, default=_json_default, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as err:
        raise ValidationError({"payload": [f"Must be a JSON value: {err}."]}) from None
    if len(text.encode()) > MAX_PAYLOAD_BYTES:
        raise ValidationError({"payload": [f"Must be at most {MAX_PAYLOAD_BYTES} bytes as JSON."]})
    return text


def decode_payload(data: bytes | str) -> Any:
    """The value of a payload's JSON text; ``ValueError`` when it is not JSON."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("payload nested too deeply") from None


def as_text(value: bytes | str) -> str:
    """``value`` as a str (replies are bytes)."""
    return value.decode() if isinstance(value, bytes) else value
