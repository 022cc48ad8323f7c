"""The multi-level cache of one DataLayer: L1 (in-process LRU) -> L2 (Redis)
-> PostgreSQL, invalidated after commit, coherent across processes.

How a read stays correct (see docs/caching.md for the user's version):

- *When*: only read-only units of work and explicit ``cached=True`` reads
  use the cache, never once the transaction has written, never for
  ``FOR UPDATE``. A read-write SERIALIZABLE unit of work reads PostgreSQL, so
  SSI still sees every read it makes.
- *Fences*: when a transaction is created (before its first statement, hence
  before its snapshot) the session records the generation of every entity
  as this process knows it. Every committed write of an entity bumps that
  generation in Redis (atomically with deleting the row's key and publishing
  the invalidation). A row read from PostgreSQL is put into L2 only if the
  generation in Redis still equals the recorded one (a Lua compare-and-set),
  and into L1 only if the local generation does (checked under the L1 lock,
  which invalidations also hold). A reader whose snapshot predates a commit
  therefore never re-inserts the row that commit replaced.
- *One state per read-only unit of work*: at REPEATABLE READ and
  SERIALIZABLE, cached reads and the database snapshot never disagree; a
  commit that lands between a cached read and the snapshot raises the
  retryable ReadSkewError (views.py).
- *Coherence*: other processes learn of invalidations from pub/sub; while the
  subscription is down, or the breaker is open, the cache is not used at all.
  What Redis could not take is logged in PostgreSQL and delivered by the
  first process to reach Redis again (journal.py).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, cast

import redis as redis_lib
from redis import Redis
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session as OrmSession

from orchestrator_data.cache.backends import LRUBackend, RedisBackend
from orchestrator_data.cache.breaker import CircuitBreaker
from orchestrator_data.cache.broadcast import Subscriber
from orchestrator_data.cache.coherence import Coherence
from orchestrator_data.cache.filler import Filler
from orchestrator_data.cache.invalidation import targets
from orchestrator_data.cache.journal import InvalidationLog, Sweeper, namespace
from orchestrator_data.cache.keys import Keys
from orchestrator_data.cache.l2 import L2
from orchestrator_data.cache.query_codecs import RowsCodec
from orchestrator_data.cache.reads import INFO_FENCE, ReadThrough
from orchestrator_data.cache.regions import CacheRegions
from orchestrator_data.cache.serialization import RowCodec
from orchestrator_data.cache.stats import CacheStats
from orchestrator_data.cache.views import ReadView
from orchestrator_data.capture.change_capture import Change, ChangeCapture
from orchestrator_data.config import Settings
from orchestrator_data.models import Achievement, Agent, Base, Session, Task

log = logging.getLogger("orchestrator_data.cache")

#: ``Session.info`` keys (INFO_FENCE: see reads.py).
INFO_CACHE = "orchestrator_data.cache"
#: Set by flushes whose invalidations went to the durable log / did not.
INFO_LOGGED = "orchestrator_data.cache.logged"
INFO_UNLOGGED = "orchestrator_data.cache.unlogged"

ROW_MODELS: dict[str, type[Base]] = {"agent": Agent, "task": Task, "session": Session}


class Cache(ReadThrough):
    """``dl.cache``: the cache of one DataLayer. Built and started by the
    DataLayer; the repositories reach it through ``Session.info``. Its read
    paths (``get_row``, ``get_query``) are in reads.py."""

    def __init__(
        self,
        settings: Settings,
        client: Redis | None,
        *,
        regions: CacheRegions | None = None,
    ) -> None:
        s = settings
        self.settings = settings
        self.enabled = bool(s.cache_enabled and s.redis_url and client is not None)
        self.keys = Keys(s.key_prefix)
        self.stats_counters = CacheStats()
        models: dict[str, type[Base]] = {**ROW_MODELS, "achievement": Achievement}
        self.codecs: dict[str, RowCodec[Any]] = {e: RowCodec(m) for e, m in models.items()}
        self.rows_codecs: dict[str, RowsCodec[Any]] = {
            e: RowsCodec(c) for e, c in self.codecs.items()
        }
        ttls = s.ttls
        self._l2_ttl: dict[str, float] = {
            "agent": ttls.agent_state,
            "task": ttls.task_result,
            "session": ttls.session,
            "query": ttls.query,
        }
        # L1 never keeps a value longer than L2 would.
        self._l1_ttl = {kind: min(s.l1_ttl, ttl) for kind, ttl in self._l2_ttl.items()}
        # Counters outlive every key built from them.
        self._counter_ttl_ms = int(max(self._l2_ttl.values()) * 2000)
        self._closed = False
        self.client: Redis | None = client
        self._probe_client: Redis | None = None
        self.breaker = CircuitBreaker(
            probe=self._ping,
            on_recover=lambda: self.coherence.recover(),
            on_state_change=lambda state: self.coherence.breaker_changed(state),
            probe_interval=s.cache_probe_interval,
            slow_call=s.cache_slow_call,
        )
        self.coherence = Coherence(
            keys=self.keys,
            stats=self.stats_counters,
            breaker=self.breaker,
            client=client if self.enabled else None,
            counter_ttl_ms=self._counter_ttl_ms,
            enabled=self.enabled,
        )
        self.regions = regions or CacheRegions.declare()
        self.regions.configure(
            l1={
                "max_entries": s.l1_max_entries,
                "ttl_for": self._l1_ttl_for,
                "admit": self.coherence.admit,
            },
            l2={
                "client": client,
                "breaker": self.breaker,
                "ttl_for": self._l2_ttl_for,
                "on_corrupt": self._corrupt,
            },
        )
        self.l1: LRUBackend = cast(LRUBackend, self.regions.l1.backend)
        self.l2: RedisBackend | None = (
            cast(RedisBackend, self.regions.l2.backend) if client is not None else None
        )
        self.coherence.attach(self.l1)
        self._filler = Filler(client, self.breaker, max_pending=s.cache_fill_queue)
        self.l2_ops = L2(
            client=client,
            breaker=self.breaker,
            keys=self.keys,
            stats=self.stats_counters,
            filler=self._filler,
            row_ttl=self._l2_ttl,
            counter_ttl_ms=self._counter_ttl_ms,
        )
        self._subscriber: Subscriber | None = None
        self._sweeper: Sweeper | None = None

    # -- lifecycle -------------------------------------------------------------

    def install(self, changes: ChangeCapture, engine: Engine) -> None:
        """Give the cache its database (call before :meth:`start`; idempotent).
        Commits flushed while this process cannot invalidate log their
        invalidations in ``cache_invalidations`` inside the committing
        transaction (a flush hook on ``changes``); the log is delivered and
        cleared on (re)subscribing, on each probe of the breaker and every
        ``cache_probe_interval`` (journal.py)."""
        if not self.enabled or self.coherence.journal is not None:
            return
        s = self.settings
        self.coherence.journal = InvalidationLog(engine, namespace(s.redis_url, s.key_prefix))
        changes.on_flush(self._log_flush, values=False)
        self._sweeper = Sweeper(self.coherence.sweep, s.cache_probe_interval)
        self.coherence.wake_sweeper = self._sweeper.wake
        if self._subscriber is not None:
            self._sweeper.start()

    def start(self) -> None:
        """Subscribe to invalidations (in the background). Until subscribed,
        reads go to PostgreSQL."""
        if not self.enabled or self._subscriber is not None:
            return
        if self._sweeper is not None:
            self._sweeper.start()
        s = self.settings
        assert s.redis_url is not None
        self._probe_client = redis_lib.Redis.from_url(
            s.redis_url,
            socket_timeout=s.cache_probe_timeout,
            socket_connect_timeout=s.cache_probe_timeout,
        )
        sub_client: Redis = redis_lib.Redis.from_url(
            s.redis_url,
            socket_connect_timeout=s.redis_connect_timeout,
            socket_keepalive=True,
            health_check_interval=max(1, int(s.cache_probe_interval)),
        )
        self._subscriber = Subscriber(
            sub_client,
            self.keys.channel,
            on_message=self.coherence.on_message,
            on_up=self.coherence.on_up,
            on_down=self.coherence.on_down,
            on_unreachable=self.coherence.on_unreachable,
            retry_interval=s.cache_probe_interval,
        )
        self._subscriber.start()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Block until the cache is usable (subscribed, breaker closed); for
        start-up scripts, tests and benchmarks. False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.usable:
                return True
            time.sleep(0.005)
        return self.usable

    def wait_for_fills(self) -> None:
        """Block until the L2 fills submitted so far are written."""
        self._filler.wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.coherence.ready = False
        self.breaker.stop()
        if self._sweeper is not None:
            self._sweeper.stop()
        if self._subscriber is not None:
            self._subscriber.stop()
        self._filler.stop()
        if self._probe_client is not None:
            self._probe_client.close()

    @property
    def usable(self) -> bool:
        """Whether reads may use the cache right now."""
        return self.coherence.ready and self.breaker.closed

    # -- session hooks ---------------------------------------------------------

    def after_transaction_create(self, session: OrmSession, transaction: Any) -> None:
        # When the transaction object is created, before any statement of it
        # (other listeners' included), so before its snapshot: every
        # generation recorded here belongs to a commit the snapshot sees.
        if transaction.parent is not None:
            return  # a savepoint keeps its transaction's view
        coherence = self.coherence
        usable = coherence.ready and self.breaker.allow()
        info = session.info
        info[INFO_FENCE] = ReadView(dict(coherence.generations) if usable else None)
        # Left by a transaction that rolled back.
        info.pop(INFO_LOGGED, None)
        info.pop(INFO_UNLOGGED, None)

    def after_transaction_end(self, session: OrmSession, transaction: Any) -> None:
        # One write for all the fills the transaction's misses queued.
        if transaction.parent is None:
            self._filler.flush()

    # -- L1 --------------------------------------------------------------------------

    def _kind(self, key: str | tuple[str, int]) -> str:
        if isinstance(key, tuple):
            return key[0]
        return key[len(self.keys.prefix) + 6 :].split(":", 1)[0]

    def _l1_ttl_for(self, key: str | tuple[str, int]) -> float:
        return self._l1_ttl.get(self._kind(key), self.settings.l1_ttl)

    def _l2_ttl_for(self, key: str) -> float:
        return self._l2_ttl.get(self._kind(key), self._l2_ttl["query"])

    # -- invalidation (see coherence.py) -----------------------------------------------

    def invalidate(self, items: Iterable[tuple[str, uuid.UUID | None, str]]) -> None:
        """Invalidate after a commit: ``(entity, id, action)`` items, ``id``
        None for "every row". Drops the L1 keys, deletes the L2 keys, bumps
        the generations (and epochs for cascades), broadcasts to the other
        processes. Never raises: if Redis is unreachable the breaker opens and
        the repair runs when it comes back."""
        self.coherence.invalidate(items)

    def on_commit(self, session: OrmSession, changes: Sequence[Any]) -> None:
        """Change-capture subscriber: invalidate what a committed transaction
        changed (``Change.entity`` / ``.ident`` / ``.action``)."""
        info = session.info
        logged = info.pop(INFO_LOGGED, False)
        unlogged = info.pop(INFO_UNLOGGED, False)
        self.coherence.invalidate(
            ((c.entity, c.ident, c.action) for c in changes), logged=logged and not unlogged
        )

    def _log_flush(self, session: OrmSession, flushed: Sequence[Change]) -> None:
        # Inside the transaction, after its changes reached the database. The
        # normal path costs one check; while this process cannot invalidate,
        # the invalidations go into the committing transaction, so they exist
        # exactly when the commit does, whatever happens to this process.
        info = session.info
        journal = self.coherence.journal
        if journal is None or self.coherence.can_invalidate:
            info[INFO_UNLOGGED] = True
            return
        t = targets((c.entity, c.ident, c.action) for c in flushed)
        if not t:
            return
        connection = session.connection()
        if not journal.available_on(connection):
            info[INFO_UNLOGGED] = True
            return
        journal.record(connection, t)
        self.stats_counters.invalidations_logged += 1
        info[INFO_LOGGED] = True

    def _corrupt(self, key: str) -> None:
        self.stats_counters.corrupt_values += 1

    def invalidate_all(self) -> None:
        """Void every cached value of this key prefix, in every process."""
        self.coherence.invalidate_all()

    def _ping(self) -> None:
        if self._probe_client is not None:
            self._probe_client.ping()

    # -- manual and metrics ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters (hits / misses per level, fills, invalidations, logged and
        replayed invalidations, corrupt values, command errors, read skews,
        broadcast lag), ``hit_ratio``, and the state of breaker, subscription
        and L1."""
        data = self.stats_counters.as_dict()
        data["breaker"] = self.breaker.state
        data["breaker_opened"] = self.breaker.opened
        data["subscribed"] = self.coherence.ready
        data["l1_entries"] = len(self.l1)
        data["l1_max_entries"] = self.l1.max_entries
        data["fills_dropped"] = self._filler.dropped
        data["command_errors"] = self.breaker.command_errors
        return data
