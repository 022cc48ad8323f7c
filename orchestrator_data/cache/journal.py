"""The durable log of invalidations Redis could not take: PostgreSQL's
``cache_invalidations`` table (migration 008).

Nothing is written in normal operation. A transaction that flushes while
this process cannot invalidate (breaker open, subscription down, a repair
pending) records its targets *inside the committing transaction*: the record
commits or rolls back with the data, and outlives a writer that dies before
it can reach Redis again. An invalidation that fails after the commit
(Redis went away in between, or refused the command) is recorded at once in
a transaction of its own.

Every process delivers and clears the records of its own cache (same Redis
address and database, same key prefix): before it trusts the cache again
after (re)subscribing, when its breaker's probe finds Redis back, and every
probe interval while the cache is in use (:class:`Sweeper`). A record is
delivered like any invalidation (L2 keys deleted, generations and epochs
bumped, the broadcast published), then deleted, in one PostgreSQL
transaction that holds its rows (``FOR UPDATE``): a second sweeper waits for
the first, and finds the records gone if it delivered them, or takes them if
it failed (or died).

Hence the bound: a lost invalidation is delivered at most one probe interval
(plus a round trip to each server) after Redis is reachable from any running
process, and a process that reconnects delivers it before it reads the
cache. Records of a cache nobody runs any more stay in the table (small, and
never read by the others).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Table, delete, insert, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from orchestrator_data.cache.breaker import REDIS_ERRORS, Unavailable
from orchestrator_data.cache.invalidation import Targets
from orchestrator_data.errors import OrchestratorDataError
from orchestrator_data.models import CacheInvalidation

log = logging.getLogger("orchestrator_data.cache")

_TABLE: Table = CacheInvalidation.__table__  # type: ignore[assignment]
#: What PostgreSQL being away (or the pool being exhausted) raises: the
#: driver's errors, and the package's translations of them.
DATABASE_ERRORS: tuple[type[Exception], ...] = (SQLAlchemyError, OrchestratorDataError)
#: What a sweep raises when PostgreSQL or Redis is away.
_AWAY: tuple[type[BaseException], ...] = (*DATABASE_ERRORS, Unavailable, *REDIS_ERRORS)

#: Records delivered per PostgreSQL transaction.
BATCH = 500
#: Above this many rows in one delivery, their entities' epochs are bumped
#: instead (one counter voids them all): the Lua call and the broadcast stay small.
MAX_ROWS = 1000


def namespace(redis_url: str | None, key_prefix: str) -> str:
    """Which cache a record belongs to: the Redis address and database of
    ``redis_url`` (never its credentials) and the key prefix."""
    parts = urlsplit(redis_url or "")
    host = parts.hostname or ""
    default_port = 6379 if parts.scheme in ("redis", "rediss") else None
    port = parts.port or default_port
    where = f"{host}:{port}" if port else host
    query = f"?{parts.query}" if parts.query and "db=" in parts.query else ""
    return f"{parts.scheme}://{where}{parts.path or '/0'}{query} {key_prefix}"


def to_json(t: Targets) -> dict[str, Any]:
    return {
        "r": sorted([e, str(i)] for e, i in t.rows),
        "g": sorted(t.generations),
        "e": sorted(t.epochs),
    }


def from_json(data: Any) -> Targets:
    """Targets of a stored record; anything unreadable voids everything (a
    record is never ignored)."""
    out = Targets()
    try:
        for entity, ident in data.get("r", ()):
            out.rows.add((str(entity), uuid.UUID(str(ident))))
        out.generations.update(str(e) for e in data.get("g", ()))
        out.epochs.update(str(e) for e in data.get("e", ()))
    except (AttributeError, TypeError, ValueError):
        log.warning("unreadable cache invalidation record: voiding every cached value")
        return Targets.everything()
    return out


def merge(records: Iterable[Targets]) -> Targets:
    out = Targets()
    for t in records:
        out.rows |= t.rows
        out.generations |= t.generations
        out.epochs |= t.epochs
    if len(out.rows) > MAX_ROWS:
        entities = {e for e, _ in out.rows}
        out.epochs |= entities
        out.generations |= entities
        out.rows = set()
    return out


class InvalidationLog:
    """The records of one cache (``namespace``) in the database of ``engine``."""

    def __init__(self, engine: Engine, namespace: str) -> None:
        self.engine = engine
        self.namespace = namespace
        self._available: bool | None = None  # None: not known
        self._checked_at = 0.0

    @property
    def available(self) -> bool:
        """Whether the table exists (the database has the migration that
        creates it); checked once, and again every minute while it does not.
        Raises one of :data:`DATABASE_ERRORS` when PostgreSQL cannot be asked."""
        if not self._stale():
            return bool(self._available)
        with self.engine.connect() as conn:
            return self.available_on(conn)

    def available_on(self, connection: Connection) -> bool:
        """:attr:`available`, checked on ``connection`` if it must be."""
        if not self._stale():
            return bool(self._available)
        found = connection.execute(text("SELECT to_regclass('cache_invalidations')")).scalar()
        self._available = found is not None
        self._checked_at = time.monotonic()
        if not self._available:
            # Info, not a warning: a database not migrated yet is normal
            # (the CLI's migrate commands meet one every time).
            log.info(
                "table cache_invalidations is missing (migrate to head): invalidations "
                "lost while Redis is away are repaired by their writer only"
            )
        return self._available

    def _stale(self) -> bool:
        if self._available is None:
            return True
        return not self._available and time.monotonic() - self._checked_at > 60.0

    def record(self, connection: Connection, targets: Targets) -> None:
        """Insert ``targets`` in the transaction of ``connection`` (the
        committing one): the record commits, or rolls back, with it."""
        connection.execute(
            insert(_TABLE).values(namespace=self.namespace, targets=to_json(targets))
        )

    def record_now(self, targets: Targets) -> bool:
        """Insert ``targets`` in a transaction of its own; False if that failed."""
        try:
            if not self.available:
                return False
            with self.engine.begin() as conn:
                self.record(conn, targets)
        except DATABASE_ERRORS as err:
            log.warning("could not log a lost cache invalidation in PostgreSQL: %s", err)
            return False
        return True

    def deliver(self, send: Callable[[Targets], object]) -> int:
        """Hand every record of this cache to ``send`` (which raises if Redis
        did not take them) and delete them; the number delivered. Records
        stay if ``send`` or PostgreSQL fails (the error propagates: one of
        :data:`DATABASE_ERRORS` for PostgreSQL, whatever ``send`` raised)."""
        if not self.available:
            return 0
        delivered = 0
        while True:
            with self.engine.begin() as conn:
                rows = conn.execute(
                    select(_TABLE.c.id, _TABLE.c.targets)
                    .where(_TABLE.c.namespace == self.namespace)
                    .order_by(_TABLE.c.id)
                    .limit(BATCH)
                    # Not SKIP LOCKED: a sweeper that finds records being
                    # delivered waits to learn whether that worked (else it
                    # could trust the cache while they are still pending).
                    .with_for_update()
                ).all()
                if not rows:
                    return delivered
                send(merge(from_json(targets) for _, targets in rows))
                conn.execute(delete(_TABLE).where(_TABLE.c.id.in_([i for i, _ in rows])))
            delivered += len(rows)
            if len(rows) < BATCH:
                return delivered


class Sweeper:
    """Calls ``sweep`` every ``interval`` seconds (and at once after
    :meth:`wake`) in a daemon thread, until stopped."""

    def __init__(self, sweep: Callable[[], object], interval: float) -> None:
        self._sweep = sweep
        self._interval = interval
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = 0.0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="cache-invalidation-sweeper", daemon=True
            )
            self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stopped.is_set():
                return
            try:
                self._sweep()
            except _AWAY as err:
                # PostgreSQL or Redis away: the next round (or the breaker's
                # probe, or the next resubscription) delivers the records.
                if self._may_warn():
                    log.warning("delivering logged cache invalidations failed: %s", err)
            except Exception:
                if self._may_warn():
                    log.exception("delivering logged cache invalidations failed")

    def _may_warn(self) -> bool:
        now = time.monotonic()
        if now - self._warned < 60.0:
            return False
        self._warned = now
        return True
