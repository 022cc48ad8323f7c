"""Key names of the coordination primitives.

Every key carries one hash tag per logical object (``{lock:agent:123}``), so
all the keys one Lua script touches live in one Redis Cluster slot, and every
key a script touches is passed to it in KEYS.
"""

from __future__ import annotations

from orchestrator_data.errors import ValidationError
from orchestrator_data.schemas import rules

#: Longest name of a lock, rate-limit key, stream or agent id in a key.
MAX_NAME = 200


def checked_name(field: str, name: object) -> str:
    """``name`` if it can be part of a key: a non-empty, storable string (no
    NUL, no unpaired surrogate) of at most :data:`MAX_NAME` characters without
    braces (which would break the hash tag); else a :class:`ValidationError`
    on ``field``."""
    text = rules.checked(field, rules.text, name, min_length=1, max_length=MAX_NAME)
    if "{" in text or "}" in text:
        raise ValidationError({field: ["Must not contain braces (they would break the hash tag)."]})
    return text


def tagged(prefix: str, kind: str, name: str) -> str:
    """The key of object ``name`` of ``kind``: ``{prefix}{kind:name}``."""
    return f"{prefix}{{{kind}:{name}}}"
