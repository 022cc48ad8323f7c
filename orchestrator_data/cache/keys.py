"""Redis key names of the cache, all under ``Settings.key_prefix``.

Values (the design's key table)::

    cache:{entity}:{id}                       agent, task, session rows
    cache:query:{entity}:{generation}:{hash}  list / search / count results

(``cache:stats:{entity}:{id}``, points totals and the leaderboard, belong to
``orchestrator_data.achievements.stats``, which keeps its own invalidation.)

Bookkeeping, one key per entity, never scanned::

    cache:generation:{entity}   bumped by every committed write of the entity;
                                part of query keys, and the fence of fills
    cache:epoch:{entity}        stamped into entity values; bumped to void
                                them all at once (invalidate_all, recovery,
                                database-side cascades)
    cache:invalidations         the pub/sub channel of L1 invalidations
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from orchestrator_data.cache import serialization


class Keys:
    """Key builder for one key prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._base = prefix + "cache:"
        self.channel = prefix + "cache:invalidations"

    def entity(self, entity: str, ident: uuid.UUID | str) -> str:
        return f"{self._base}{entity}:{ident}"

    def entity_prefix(self, entity: str) -> str:
        return f"{self._base}{entity}:"

    def query(self, entity: str, generation: int, digest: str) -> str:
        return f"{self._base}query:{entity}:{generation}:{digest}"

    def generation(self, entity: str) -> str:
        return f"{self._base}generation:{entity}"

    def epoch(self, entity: str) -> str:
        return f"{self._base}epoch:{entity}"


def digest(*parts: Any) -> str:
    """A stable hash of a query's name and arguments (JSON of the parts,
    UUIDs / datetimes / sets rendered deterministically)."""
    text = serialization.dumps([_plain(p) for p in parts])
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return f"{type(value).__name__}:{value!s}"
