"""Durations as people type them (``90d``, ``12h``): command-line options
such as ``audit prune --older-than`` parse them here. Standard library only,
so that the CLI can check its arguments before it loads anything heavy."""

from __future__ import annotations

import re
from datetime import timedelta

from orchestrator_data.errors import ValidationError

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


def parse_duration(value: str, field: str = "older_than") -> timedelta:
    """``"90d"``, ``"12h"``, ``"30m"``, ``"45s"`` or ``"2w"`` as a positive timedelta;
    anything else is a :class:`ValidationError` on ``field`` saying what is expected."""
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValidationError(
            {field: [f"{value!r} is not a duration like 90d, 12h, 30m, 45s or 2w."]}
        )
    if int(match[1]) <= 0:
        raise ValidationError({field: [f"{value!r} must be positive, e.g. 90d."]})
    try:
        return timedelta(**{_UNITS[match[2]]: int(match[1])})
    except OverflowError:
        raise ValidationError(
            {field: [f"{value!r} is too long: at most {timedelta.max.days} days."]}
        ) from None
