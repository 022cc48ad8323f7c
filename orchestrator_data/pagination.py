"""Keyset pagination: opaque cursors over a stable (column, id) order."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from orchestrator_data.errors import ValidationError
from orchestrator_data.schemas import rules

T = TypeVar("T")

#: Longer than any cursor :func:`encode_cursor` makes (a 255-character name
#: of 4-byte characters, escaped, is about 2,100).
MAX_CURSOR_LENGTH = 4096


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of results; pass ``next_cursor`` as ``after=`` for the next one.
    ``next_cursor`` is ``None`` on the last page."""

    items: list[T]
    next_cursor: str | None

    def __iter__(self) -> Any:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def encode_cursor(value: Any, ident: uuid.UUID) -> str:
    if isinstance(value, datetime):
        payload = ["dt", value.isoformat(), str(ident)]
    elif isinstance(value, uuid.UUID):
        payload = ["uuid", str(value), str(ident)]
    else:
        payload = ["v", value, str(ident)]
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: Any) -> tuple[Any, uuid.UUID]:
    """Inverse of :func:`encode_cursor`; a malformed cursor is a ValidationError
    naming ``after``. The value is checked for its kind only (an aware
    datetime, a UUID, or a JSON scalar): whether it suits the order column
    is for the repository to check, with that column's field."""
    try:
        return _decode(cursor)
    except (rules.Invalid, ValueError, TypeError, RecursionError, binascii.Error):
        raise ValidationError({"after": ["Not a valid cursor."]}) from None


def _decode(cursor: Any) -> tuple[Any, uuid.UUID]:
    if not isinstance(cursor, str) or len(cursor) > MAX_CURSOR_LENGTH:
        raise rules.Invalid("not a cursor")
    padded = cursor + "=" * (-len(cursor) % 4)
    # Bounded length, but json's C decoder recurses: "[[[[..." is a RecursionError.
    parts = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    if not isinstance(parts, list) or len(parts) != 3:
        raise rules.Invalid("not a cursor")
    kind, value, ident = parts
    if kind == "dt":
        value = rules.aware_datetime(datetime.fromisoformat(rules.text(value, max_length=64)))
    elif kind == "uuid":
        value = rules.uuid_value(value)
    elif kind != "v" or isinstance(value, (list, dict)):
        raise rules.Invalid("not a cursor")
    elif isinstance(value, str):
        rules.storable(value)
    return value, rules.uuid_value(ident)
