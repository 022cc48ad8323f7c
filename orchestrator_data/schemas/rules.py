"""The validation rules: one set, applied wherever input enters the data layer.

The schemas' fields (create and update), the repositories' filters, the
keyset cursors and :class:`~orchestrator_data.actor.Actor` all check values
with these functions, so a value is accepted or refused the same way
wherever it comes in, and always before anything is sent to PostgreSQL.
Limits a column states (``String(n)``, ``Integer``) are read from the models
by :func:`orchestrator_data.schemas.base.field_for`; the constants below are
the limits no column states.

Standard library and ``errors`` only: the package root imports the Actor and
the cursors, and importing it must not load SQLAlchemy.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any, TypeVar

from orchestrator_data.errors import ValidationError

T = TypeVar("T")

#: Nesting limit of a JSON value: objects and arrays at most this many levels
#: deep. Far below what any recursive consumer (change capture, the audit
#: trail, the cache, json) needs stack for.
MAX_JSON_DEPTH = 64
#: Size limit of one JSON value, in characters of its compact JSON text.
MAX_JSON_SIZE = 1 << 20
#: Size limit of a JSON value that is full-text indexed (``tasks.payload``):
#: PostgreSQL refuses a tsvector whose words exceed 1 MB, and 128 Ki
#: characters stay under it whatever the characters.
MAX_SEARCHABLE_JSON_SIZE = 1 << 17
#: Integers inside JSON values: 64-bit signed (what JSON consumers and
#: ``(value->>'n')::bigint`` handle); larger numbers belong in strings.
JSON_INT_MIN, JSON_INT_MAX = -(2**63), 2**63 - 1
#: Length limit of a text column without one (``Text``), in characters.
MAX_TEXT_LENGTH = 1 << 20
#: PostgreSQL integer column types and their ranges.
SMALLINT = (-(2**15), 2**15 - 1)
INTEGER = (-(2**31), 2**31 - 1)
BIGINT = (-(2**63), 2**63 - 1)
#: Datetimes: aware ones only, between these instants. A day inside Python's
#: own range at each end, so that a value read back in any session time zone
#: is still a Python datetime.
DATETIME_MIN = datetime(1, 1, 2, tzinfo=timezone.utc)
DATETIME_MAX = datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=timezone.utc)

# PostgreSQL text cannot hold U+0000 (neither can JSONB strings or keys), and
# a lone surrogate has no UTF-8 encoding: the driver would raise on either.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class Invalid(Exception):
    """A value broke a rule; the message says which (without the value)."""


def checked(
    field: str,
    check: Callable[..., T],
    value: Any,
    *args: Any,
    entity: str | None = None,
    **kw: Any,
) -> T:
    """``check(value, *args, **kw)``, or a :class:`ValidationError` naming ``field``."""
    try:
        return check(value, *args, **kw)
    except Invalid as err:
        raise ValidationError({field: [str(err)]}, entity=entity) from None


def storable(value: str, what: str = "Text") -> str:
    """``value`` if PostgreSQL can store it: no NUL, no unpaired surrogate."""
    found = _UNSTORABLE.search(value)
    if found is None:
        return value
    if found.group() == "\x00":
        raise Invalid(f"{what} must not contain NUL characters (U+0000).")
    raise Invalid(f"{what} must not contain unpaired surrogates (U+D800 to U+DFFF).")


def text(value: Any, *, min_length: int = 0, max_length: int | None = MAX_TEXT_LENGTH) -> str:
    """A storable string of ``min_length`` to ``max_length`` characters."""
    if not isinstance(value, str):
        raise Invalid("Not a valid string.")
    if len(value) < min_length:
        raise Invalid("Must not be empty." if min_length == 1 else f"Shorter than {min_length}.")
    if max_length is not None and len(value) > max_length:
        raise Invalid(f"Longer than {max_length} characters.")
    return storable(value)


def one_of(value: Any, allowed: Iterable[str]) -> str:
    """``value`` if it is one of the strings ``allowed``."""
    options = tuple(allowed)
    if not isinstance(value, str) or value not in options:
        raise Invalid(f"Must be one of: {', '.join(options)}.")
    return value


def integer(value: Any, low: int, high: int) -> int:
    """An int (not a bool) between ``low`` and ``high`` inclusive."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid("Not a valid integer.")
    if not low <= value <= high:
        raise Invalid(f"Must be between {low} and {high}.")
    return int(value)


def boolean(value: Any) -> bool:
    """``True`` or ``False`` (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise Invalid("Not a valid boolean.")
    return value


def uuid_value(value: Any) -> uuid.UUID:
    """A UUID, or its text form."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str) and len(value) <= 64:
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise Invalid("Not a valid UUID.")


def aware_datetime(value: Any) -> datetime:
    """An aware datetime within ``DATETIME_MIN`` .. ``DATETIME_MAX``, converted
    to UTC (the same instant). Naive datetimes are refused, everywhere: the
    data layer does not guess a time zone."""
    if not isinstance(value, datetime):
        raise Invalid("Not a valid datetime.")
    try:
        offset = value.utcoffset()
    except (ValueError, TypeError, OverflowError):
        offset = None
    if offset is None:
        raise Invalid("Must be timezone-aware (naive datetimes are refused).")
    try:
        utc = value.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        utc = None
    if utc is None or not DATETIME_MIN <= utc <= DATETIME_MAX:
        raise Invalid(f"Must be between {DATETIME_MIN.isoformat()} and {DATETIME_MAX.isoformat()}.")
    return utc


def ip_address(value: Any) -> str:
    """An IPv4 or IPv6 address, or an address with its network prefix
    (``10.0.0.7/24``), as PostgreSQL's ``inet`` stores it: canonical text,
    ``/32`` and ``/128`` dropped. Zone ids (``%eth0``) are refused: ``inet``
    has none."""
    if isinstance(
        value,
        (
            ipaddress.IPv4Address,
            ipaddress.IPv6Address,
            ipaddress.IPv4Interface,
            ipaddress.IPv6Interface,
        ),
    ):
        value = str(value)
    if not isinstance(value, str) or len(value) > 64 or "%" in value:
        raise Invalid("Not a valid IP address.")
    try:
        interface = ipaddress.ip_interface(value)
    except ValueError:
        raise Invalid("Not a valid IP address.") from None
    return str(interface).removesuffix("/32").removesuffix("/128")


def json_value(value: Any, *, max_size: int = MAX_JSON_SIZE) -> Any:
    """``value`` if PostgreSQL can store it as JSONB and every reader can
    handle it: dicts with string keys, lists and tuples, strings, finite
    floats, integers in ``JSON_INT_MIN`` .. ``JSON_INT_MAX``, booleans and
    ``None``; strings and keys storable (no NUL, no lone surrogate); at most
    ``MAX_JSON_DEPTH`` levels of nesting and ``max_size`` characters of
    compact JSON.

    The walk is iterative, one nesting level at a time (however deep the
    input, no RecursionError), and keeps a lower bound of the encoded size,
    so it stops early on a huge or self-referencing value.
    """
    budget = max_size
    texts: list[str] = []  # strings and keys, checked at once at the end
    level: list[Any] = [value]
    depth = 0
    while level:
        below: list[Any] = []
        for item in level:
            kind = type(item)
            if kind is str:
                texts.append(item)
                budget -= len(item) + 2
            elif kind is dict or kind is list or kind is tuple:
                if depth >= MAX_JSON_DEPTH:
                    raise Invalid(f"Nested more than {MAX_JSON_DEPTH} levels deep.")
                budget -= len(item) + 1  # brackets and commas
                if kind is dict:
                    for key in item:
                        if type(key) is not str and not isinstance(key, str):
                            raise Invalid("JSON object keys must be strings.")
                        budget -= len(key) + 3
                    texts.extend(item)
                    below.extend(item.values())
                else:
                    below.extend(item)
                if budget < 0:
                    raise _too_large(max_size)
            elif item is None or kind is bool:
                budget -= 4
            elif kind is int:
                if not JSON_INT_MIN <= item <= JSON_INT_MAX:
                    raise Invalid(
                        f"JSON integers must be between {JSON_INT_MIN} and {JSON_INT_MAX}"
                        " (store larger numbers as strings)."
                    )
                budget -= 1
            elif kind is float:
                if not math.isfinite(item):
                    raise Invalid("JSON has no NaN or Infinity.")
                budget -= 1
            else:
                # A subclass (an OrderedDict, a str or int Enum, ...) is checked
                # as its base type, at this same level.
                level.append(_plain(item))
        level = below
        depth += 1
    if budget < 0:
        raise _too_large(max_size)
    storable("".join(texts), "JSON strings and keys")
    if len(_encode(value)) > max_size:
        raise _too_large(max_size)
    return value


def _plain(item: Any) -> Any:
    # The value json encodes for a subclass instance; anything else is not JSON.
    if isinstance(item, str):
        return str.__str__(item)
    if isinstance(item, int):
        return bool(item) if isinstance(item, bool) else int.__int__(item)
    if isinstance(item, float):
        return float.__float__(item)
    if isinstance(item, dict):
        return dict(item)
    if isinstance(item, (list, tuple)):
        return list(item)
    raise Invalid(f"Not a JSON value: {type(item).__name__}.")


def _too_large(max_size: int) -> Invalid:
    return Invalid(f"Larger than {max_size} characters of JSON.")


# Safe once the walk passed: bounded depth, no cycle, JSON types only.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def json_object(value: Any, *, max_size: int = MAX_JSON_SIZE) -> dict[str, Any]:
    """A JSON object (a dict), by the rules of :func:`json_value`."""
    if not isinstance(value, dict):
        raise Invalid("Must be a JSON object.")
    result: dict[str, Any] = json_value(value, max_size=max_size)
    return result
