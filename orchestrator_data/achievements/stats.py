"""Points of agents and the leaderboard, cached in Redis under ``cache:stats:…``.

PostgreSQL is the truth; Redis only spares the aggregate queries. Entries
live ``Settings.ttls.metrics`` (1 h) and are invalidated after every commit
that changes achievements. Redis being down never fails a read: it falls
back to PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import cast

from redis import Redis
from sqlalchemy import select
from sqlalchemy.orm import Session as OrmSession

from orchestrator_data.cache.breaker import CLOSED, CircuitBreaker, Unavailable
from orchestrator_data.capture.change_capture import Change, ChangeCapture
from orchestrator_data.models import Achievement
from orchestrator_data.repositories.base import coerce_uuid
from orchestrator_data.uow import UnitOfWork

log = logging.getLogger("orchestrator_data.achievements.stats")

#: The leaderboard is cached once, this long; shorter ones are slices of it.
LEADERBOARD_SIZE = 100
_DIRTY = "orchestrator_data.achievements.dirty_agents"

# Each cached value has a version key beside it (same hash tag, so the pair
# stays in one Redis Cluster slot). A reader notes the version before it
# reads PostgreSQL and fills only if the version is unchanged: a total read
# before a commit can never be cached after that commit's invalidation.
_FILL = """
local seen = ARGV[1]
local now = redis.call('GET', KEYS[2])
if (now == false and seen == '') or now == seen then
    redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
    return 1
end
return 0
"""


@dataclass(frozen=True)
class LeaderboardEntry:
    agent_id: uuid.UUID
    name: str
    points: int


class StatsCache:
    """Cached points totals and the leaderboard; :meth:`install` it on a
    change capture so that committed changes to achievements invalidate them.

    ``redis`` is the cache's client (None: every read goes to PostgreSQL),
    ``breaker`` the cache's circuit breaker (so Redis going away is reported
    once, not per call), ``reader`` opens a read-only unit of work, and every
    key starts with ``key_prefix`` and lives ``ttl`` seconds.
    """

    def __init__(
        self,
        *,
        redis: Redis | None,
        breaker: CircuitBreaker,
        reader: Callable[[], AbstractContextManager[UnitOfWork]],
        key_prefix: str = "",
        ttl: int = 3600,
    ) -> None:
        self._redis = redis
        self._breaker = breaker
        self._reader = reader
        self._prefix = key_prefix
        self._ttl = ttl
        # Agents whose totals could not be invalidated while Redis was away:
        # invalidated as soon as the breaker closes again.
        self._missed: set[uuid.UUID] = set()
        self._missed_lock = threading.Lock()
        breaker.add_listener(self._breaker_changed)

    # -- keys ------------------------------------------------------------------

    def agent_key(self, agent_id: uuid.UUID) -> str:
        """Key of the cached points total of ``agent_id``."""
        return f"{self._prefix}cache:stats:agent:{{{agent_id}}}"

    def leaderboard_key(self) -> str:
        """Key of the cached leaderboard (top :data:`LEADERBOARD_SIZE`)."""
        return f"{self._prefix}cache:stats:leaderboard:{{top{LEADERBOARD_SIZE}}}"

    # -- reads -----------------------------------------------------------------

    def points_of(self, agent_id: uuid.UUID | str) -> int:
        """Total points of ``agent_id`` (0 when none)."""
        ident = coerce_uuid(agent_id, "agent_id")
        key = self.agent_key(ident)
        cached, version = self._get(key)
        if cached is not None:
            return int(cached)
        with self._reader() as uow:
            points = uow.achievements.points_of(ident)
        self._fill(key, version, str(points).encode())
        return points

    def leaderboard(self, limit: int = 10) -> list[LeaderboardEntry]:
        """Agents with the most points, best first (ties by name)."""
        if limit > LEADERBOARD_SIZE:
            return self._leaderboard_from_db(limit)
        key = self.leaderboard_key()
        cached, version = self._get(key)
        if cached is not None:
            rows = json.loads(cached)
            return [LeaderboardEntry(uuid.UUID(i), n, p) for i, n, p in rows[:limit]]
        entries = self._leaderboard_from_db(LEADERBOARD_SIZE)
        payload = json.dumps([[str(e.agent_id), e.name, e.points] for e in entries])
        self._fill(key, version, payload.encode())
        return entries[:limit]

    def _leaderboard_from_db(self, limit: int) -> list[LeaderboardEntry]:
        with self._reader() as uow:
            return [LeaderboardEntry(*row) for row in uow.achievements.leaderboard(limit=limit)]

    # -- invalidation ----------------------------------------------------------

    def invalidate(self, agent_ids: Iterable[uuid.UUID]) -> None:
        """Drop the cached totals of ``agent_ids`` and the leaderboard. While
        Redis is away they are remembered and dropped once it is back."""
        ids = set(agent_ids)
        if self._redis is None:
            return
        client = self._redis
        with self._missed_lock:
            ids |= self._missed
            self._missed = set()
        keys = [self.agent_key(i) for i in ids] + [self.leaderboard_key()]

        def send() -> None:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                # Version first: a reader between the two commands cannot fill.
                pipe.incr(key + ":version")
                pipe.expire(key + ":version", self._ttl * 2)
                pipe.delete(key)
            pipe.execute()

        try:
            self._breaker.execute(send)
        except Unavailable:
            # The commit stands; the breaker has said Redis is away.
            with self._missed_lock:
                self._missed |= ids

    def _breaker_changed(self, state: str) -> None:
        if state == CLOSED and self._missed:
            self.invalidate(())

    def install(self, changes: ChangeCapture) -> None:
        """Invalidate after each commit that changed achievements (or deleted
        agents, whose achievements the database cascades away)."""
        changes.on_flush(self._collect, values=False)
        changes.on_commit(self._after_commit)
        changes.on_rollback(self._after_rollback)

    def _collect(self, session: OrmSession, flushed: Sequence[Change]) -> None:
        # Inside the transaction: note whose points may change. An update's
        # Change names only the changed fields, so the owner may need a lookup.
        dirty: set[uuid.UUID] = session.info.setdefault(_DIRTY, set())
        unknown: list[uuid.UUID] = []
        for change in flushed:
            if change.entity == "agent" and change.action == "delete":
                dirty.add(change.ident)
            elif change.entity == "achievement":
                owners = {
                    values.get("agent_id")
                    for values in (change.old, change.new)
                    if values is not None
                } - {None}
                if owners:
                    dirty.update(coerce_uuid(o, "agent_id") for o in owners)
                else:
                    unknown.append(change.ident)
        if unknown:
            query = select(Achievement.agent_id).where(Achievement.id.in_(unknown))
            dirty.update(session.connection().execute(query).scalars())
        if not dirty:
            session.info.pop(_DIRTY, None)

    def _after_commit(self, session: OrmSession, committed: Sequence[Change]) -> None:
        dirty: set[uuid.UUID] | None = session.info.pop(_DIRTY, None)
        if dirty:
            self.invalidate(dirty)

    def _after_rollback(self, session: OrmSession) -> None:
        session.info.pop(_DIRTY, None)

    # -- Redis, failing soft -----------------------------------------------------

    def _get(self, key: str) -> tuple[bytes | None, bytes | None]:
        """(cached value, version) of ``key``; (None, None) when Redis is away."""
        client = self._redis
        if client is None:
            return None, None
        try:
            value, version = self._breaker.execute(lambda: client.mget([key, key + ":version"]))
        except Unavailable:
            return None, None
        # The client is built without decode_responses: values are bytes.
        return cast("bytes | None", value), cast("bytes | None", version)

    def _fill(self, key: str, version: bytes | None, value: bytes) -> None:
        """Cache ``value`` unless ``key`` was invalidated since ``version`` was read."""
        client = self._redis
        if client is None:
            return
        args = (key, key + ":version", version or b"", value, str(self._ttl))
        try:
            self._breaker.execute(lambda: client.eval(_FILL, 2, *args))
        except Unavailable:
            return
