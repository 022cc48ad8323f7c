"""Small validators for filter values, shared by the entity repositories."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from orchestrator_data.errors import ValidationError


def one_of(name: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValidationError({name: [f"Must be one of: {', '.join(allowed)}."]})
    return str(value)


def text(name: str, value: Any, max_length: int = 255) -> str:
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise ValidationError(
            {name: [f"Must be a non-empty string of at most {max_length} characters."]}
        )
    return value


def integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError({name: [f"Must be an integer between {low} and {high}."]})
    return value
