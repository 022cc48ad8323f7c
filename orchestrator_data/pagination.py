"""Keyset pagination: opaque cursors over a stable (column, id) order."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from orchestrator_data.errors import ValidationError

T = TypeVar("T")


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


def decode_cursor(cursor: str) -> tuple[Any, uuid.UUID]:
    """Inverse of :func:`encode_cursor`; a malformed cursor is a ValidationError."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        kind, value, ident = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if kind == "dt":
            value = datetime.fromisoformat(value)
        elif kind == "uuid":
            value = uuid.UUID(value)
        return value, uuid.UUID(ident)
    except (ValueError, TypeError) as err:
        raise ValidationError({"after": ["Not a valid cursor."]}) from err
