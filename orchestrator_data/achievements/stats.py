"""Points of agents and the leaderboard, cached in Redis under ``cache:stats:…``.

PostgreSQL is the truth; Redis only spares the aggregate queries. Entries
live ``Settings.ttls.metrics`` (1 h) and are invalidated after every commit
that changes achievements. Redis being down never fails a read: it falls
back to PostgreSQL; so does a command Redis refuses (without opening the
breaker), and so does a value that is not one this class wrote (garbage, a
points total that is not a non-negative integer, a leaderboard of another
shape): it is counted in :attr:`StatsCache.corrupt`, deleted, and never
returned.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

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

# Bump the version (replacing one that is not a counter), then drop the value.
_INVALIDATE = """
if type(redis.pcall('INCR', KEYS[2])) == 'table' then
    redis.call('DEL', KEYS[2])
    redis.call('INCR', KEYS[2])
end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
redis.call('DEL', KEYS[1])
return 1
"""

#: Longest decimal a cached points total may have.
_MAX_DIGITS = 18


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
        #: Cached values found corrupt (deleted and read from PostgreSQL instead).
        self.corrupt = 0
        self._invalidate_script = redis.register_script(_INVALIDATE) if redis is not None else None
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
            if cached.isdigit() and len(cached) <= _MAX_DIGITS:
                return int(cached)
            self._corrupt(key, "not a points total")
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
            board = _parse_leaderboard(cached)
            if board is not None:
                return board[:limit]
            self._corrupt(key, "not a leaderboard")
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
        script = self._invalidate_script
        assert script is not None

        def send() -> None:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                # Version first: a reader between the two commands cannot fill.
                script(keys=[key, key + ":version"], args=[self._ttl * 2], client=pipe)
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
        if value is not None and not isinstance(value, bytes):
            value = b""  # not ours: corrupt
        if not isinstance(version, bytes):
            version = None
        return value, version

    def _corrupt(self, key: str, what: str) -> None:
        self.corrupt += 1  # not atomic: a metric
        log.warning("deleting a corrupt cached value at %s (%s)", key, what)
        client = self._redis
        if client is not None:
            self._breaker.call(lambda: client.delete(key), None)

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


def _parse_leaderboard(data: bytes) -> list[LeaderboardEntry] | None:
    """The cached leaderboard, or None if ``data`` is not one."""
    try:
        rows = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(rows, list):
        return None
    out: list[LeaderboardEntry] = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3):
            return None
        ident, name, points = row
        if not (isinstance(ident, str) and isinstance(name, str) and type(points) is int):
            return None
        try:
            out.append(LeaderboardEntry(uuid.UUID(ident), name, points))
        except ValueError:
            return None
    return out
