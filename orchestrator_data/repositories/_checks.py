"""The rules (``schemas.rules``) for arguments that are not a schema field
(``limit``, a search ``query``, ...), as ValidationErrors naming the argument.
Filter values are checked by the schema fields themselves (``Repository._check``)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from orchestrator_data.schemas import rules


def one_of(name: str, value: Any, allowed: Iterable[str]) -> str:
    return rules.checked(name, rules.one_of, value, allowed)


def text(name: str, value: Any, max_length: int = 255) -> str:
    return rules.checked(name, rules.text, value, min_length=1, max_length=max_length)


def integer(name: str, value: Any, low: int, high: int) -> int:
    return rules.checked(name, rules.integer, value, low, high)


def boolean(name: str, value: Any) -> bool:
    return rules.checked(name, rules.boolean, value)


def optional_boolean(name: str, value: Any) -> bool | None:
    return None if value is None else boolean(name, value)


def aware_datetime(name: str, value: Any) -> datetime:
    return rules.checked(name, rules.aware_datetime, value)


def values(value: Any) -> list[Any]:
    """``value`` as a list: one value, or a list, tuple or set of them (each
    then checked as one value: anything else is refused there)."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    return [value]
