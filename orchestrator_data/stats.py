"""Points of agents and the leaderboard, cached in Redis under ``cache:stats:…``.

PostgreSQL is the truth; Redis only spares the aggregate queries. Entries
live ``Settings.ttls.metrics`` (1 h) and are invalidated after every commit
that changes achievements. Redis being down never fails a read: it falls
back to PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import redis as redis_lib
from sqlalchemy import select
from sqlalchemy.orm import Session as OrmSession

from orchestrator_data.changes import Change, ChangeCapture
from orchestrator_data.models import Achievement
from orchestrator_data.repositories.base import coerce_uuid

if TYPE_CHECKING:
    from orchestrator_data.datalayer import DataLayer

log = logging.getLogger("orchestrator_data.stats")

#: The leaderboard is cached once, this long; shorter ones are slices of it.
LEADERBOARD_SIZE = 100
_DIRTY = "orchestrator_data.stats.dirty_agents"

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
    """Cached points totals and leaderboard of ``dl``; install on its change
    capture so that committed changes to achievements invalidate them."""

    def __init__(self, dl: DataLayer) -> None:
        self._dl = dl
        self._ttl = dl.settings.ttls.metrics

    # -- keys ------------------------------------------------------------------

    def agent_key(self, agent_id: uuid.UUID) -> str:
        """Key of the cached points total of ``agent_id``."""
        return self._dl.key(f"cache:stats:agent:{{{agent_id}}}")

    def leaderboard_key(self) -> str:
        """Key of the cached leaderboard (top :data:`LEADERBOARD_SIZE`)."""
        return self._dl.key(f"cache:stats:leaderboard:{{top{LEADERBOARD_SIZE}}}")

    # -- reads -----------------------------------------------------------------

    def points_of(self, agent_id: uuid.UUID | str) -> int:
        """Total points of ``agent_id`` (0 when none)."""
        ident = coerce_uuid(agent_id, "agent_id")
        key = self.agent_key(ident)
        cached, version = self._get(key)
        if cached is not None:
            return int(cached)
        with self._dl.unit_of_work(read_only=True, isolation="READ COMMITTED") as uow:
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
        with self._dl.unit_of_work(read_only=True, isolation="READ COMMITTED") as uow:
            return [LeaderboardEntry(*row) for row in uow.achievements.leaderboard(limit=limit)]

    # -- invalidation ----------------------------------------------------------

    def invalidate(self, agent_ids: Iterable[uuid.UUID]) -> None:
        """Drop the cached totals of ``agent_ids`` and the leaderboard."""
        keys = [self.agent_key(i) for i in agent_ids] + [self.leaderboard_key()]
        try:
            pipe = self._dl.redis.pipeline(transaction=False)
            for key in keys:
                # Version first: a reader between the two commands cannot fill.
                pipe.incr(key + ":version")
                pipe.expire(key + ":version", self._ttl * 2)
                pipe.delete(key)
            pipe.execute()
        except redis_lib.RedisError as err:
            # The commit stands; the totals may be stale until their TTL.
            log.warning("could not invalidate %d stats keys: %s", len(keys), err)

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
        """(cached value, version) of ``key``; (None, None) when Redis is down."""
        try:
            value, version = self._dl.redis.mget([key, key + ":version"])
        except redis_lib.RedisError as err:
            log.warning("stats cache unavailable, reading PostgreSQL: %s", err)
            return None, None
        # The client is built without decode_responses: values are bytes.
        return cast("bytes | None", value), cast("bytes | None", version)

    def _fill(self, key: str, version: bytes | None, value: bytes) -> None:
        """Cache ``value`` unless ``key`` was invalidated since ``version`` was read."""
        try:
            self._dl.redis.eval(
                _FILL, 2, key, key + ":version", version or b"", value, str(self._ttl)
            )
        except redis_lib.RedisError as err:
            log.warning("stats cache unavailable, not caching: %s", err)
