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
- *Coherence*: other processes learn of invalidations from pub/sub; while the
  subscription is down, or the breaker is open, the cache is not used at all.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import redis as redis_lib
from dogpile.cache.api import NO_VALUE
from redis import Redis
from sqlalchemy.orm import Session as OrmSession

from orchestrator_data.cache import serialization
from orchestrator_data.cache.backends import LRUBackend, RedisBackend
from orchestrator_data.cache.breaker import CLOSED, CircuitBreaker
from orchestrator_data.cache.broadcast import Subscriber
from orchestrator_data.cache.coherence import Coherence, Fence
from orchestrator_data.cache.filler import Filler
from orchestrator_data.cache.keys import Keys, digest
from orchestrator_data.cache.l2 import L2
from orchestrator_data.cache.query_codecs import QueryCodec, RowsCodec
from orchestrator_data.cache.regions import CacheRegions
from orchestrator_data.cache.serialization import Row, RowCodec
from orchestrator_data.cache.stats import CacheStats
from orchestrator_data.capture.change_capture import has_written
from orchestrator_data.capture.session_info import INFO_READ_ONLY
from orchestrator_data.config import Settings
from orchestrator_data.models import Achievement, Agent, Base, Session, Task

log = logging.getLogger("orchestrator_data.cache")

#: ``Session.info`` keys.
INFO_CACHE = "orchestrator_data.cache"
INFO_FENCE = "orchestrator_data.cache.fence"

ROW_MODELS: dict[str, type[Base]] = {"agent": Agent, "task": Task, "session": Session}

ModelT = TypeVar("ModelT", bound=Base)
Q = TypeVar("Q")


class Cache:
    """``dl.cache``: the cache of one DataLayer. Built and started by the
    DataLayer; the repositories reach it through ``Session.info``."""

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
            l2={"client": client, "breaker": self.breaker, "ttl_for": self._l2_ttl_for},
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

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to invalidations (in the background). Until subscribed,
        reads go to PostgreSQL."""
        if not self.enabled or self._subscriber is not None:
            return
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
            return  # a savepoint keeps its transaction's fence
        coherence = self.coherence
        usable = coherence.ready and self.breaker.allow()
        session.info[INFO_FENCE] = dict(coherence.generations) if usable else None

    def after_transaction_end(self, session: OrmSession, transaction: Any) -> None:
        # One write for all the fills the transaction's misses queued.
        if transaction.parent is None:
            self._filler.flush()

    def fence_for(self, session: OrmSession, cached: bool | None) -> Fence | None:
        """The fence of ``session``'s transaction if this read may use the
        cache, else None. ``cached``: None = the unit of work decides (read-only
        ones use the cache), True / False = the caller does."""
        info = session.info
        read_only = info.get(INFO_READ_ONLY)
        if cached is None:
            if not read_only:
                return None
        elif not cached:
            return None
        fence: Fence | None = info.get(INFO_FENCE)
        if fence is None or not self.coherence.ready or self.breaker._state != CLOSED:
            return None
        if not read_only and (
            has_written(session) or session.new or session.deleted or session.dirty
        ):
            # The transaction has written (or is about to, at the next
            # autoflush): its reads must see its own writes, from PostgreSQL.
            return None
        return fence

    # -- reads -------------------------------------------------------------------

    def get_row(
        self,
        session: OrmSession,
        model: type[ModelT],
        ident: uuid.UUID,
        *,
        cached: bool | None = None,
    ) -> ModelT | None:
        """Read-through ``session.get(model, ident)``: L1, then L2, then
        PostgreSQL. Concurrent misses of one key in this process wait for one
        database read (dogpile's lock)."""
        stats = self.stats_counters
        entity = model.__entity__
        fence = self.fence_for(session, cached)
        gen = fence.get(entity) if fence is not None else None
        if gen is None:
            stats.bypassed += 1
            return session.get(model, ident)
        codec: RowCodec[ModelT] = self.codecs[entity]
        # L1 keys rows by (entity, id as int): no string formatting and no
        # Python-level UUID.__hash__ on a hit.
        local = (entity, ident.int)
        found = self.l1.get(local)  # type: ignore[arg-type]
        if found is not NO_VALUE:
            stats.l1_hits += 1
            return codec.hydrate(found.payload[2])
        stats.l1_misses += 1
        key = self.keys.entity(entity, ident)
        # L2 outside the lock: an L2 hit costs one round trip and no locking.
        row = self.l2_ops.read_row(codec, key)
        if row is not None:
            self.regions.l1.set(local, (entity, gen, row))  # type: ignore[arg-type]
            return codec.hydrate(row)
        loaded: list[ModelT | None] = []

        def load() -> tuple[str, int, Row] | None:
            # Under dogpile's per-key lock: concurrent misses wait for this
            # one read and then find its row in L1.
            stats.loads += 1
            obj = session.get(model, ident)
            loaded.append(obj)
            if obj is None:
                return None
            loaded_row = codec.from_instance(obj)
            self.l2_ops.fill_row(codec, key, gen, loaded_row)
            return (entity, gen, loaded_row)

        value = self.regions.l1.get_or_create(
            local,  # type: ignore[arg-type]
            load,
            should_cache_fn=_is_not_none,
        )
        if loaded:
            return loaded[0]
        if value is None:
            return None
        return codec.hydrate(value[2])

    def get_query(
        self,
        session: OrmSession,
        entity: str,
        parts: Sequence[Any],
        load: Callable[[], Q],
        codec: QueryCodec[Q],
        *,
        cached: bool | None = None,
    ) -> Q:
        """Read-through query result under ``cache:query:{entity}:{generation}:{hash}``:
        any committed write of ``entity`` moves its generation, so the result
        is never served after one."""
        fence = self.fence_for(session, cached)
        gen = fence.get(entity) if fence is not None else None
        if gen is None:
            self.stats_counters.bypassed += 1
            return load()
        key = self.keys.query(entity, gen, digest(*parts))
        return self._through(key, entity, gen, load, codec, self._l2_ttl["query"])

    def _through(
        self,
        key: str,
        entity: str,
        gen: int,
        load: Callable[[], Q],
        codec: QueryCodec[Q],
        ttl: float,
    ) -> Q:
        stats = self.stats_counters
        found = self.l1.get(key)
        if found is not NO_VALUE:
            stats.l1_hits += 1
            return codec.from_l1(found.payload[2])
        stats.l1_misses += 1
        frozen = self.l2_ops.read_value(key, codec)
        if frozen is not NO_VALUE:
            self.regions.l1.set(key, (entity, gen, frozen))
            hit: Q = codec.from_l1(frozen)
            return hit
        loaded: list[Q] = []

        def create() -> tuple[str, int, Any]:
            stats.loads += 1
            value = load()
            loaded.append(value)
            fresh = codec.to_l1(value)
            text = serialization.dumps(codec.to_json(fresh))
            self.l2_ops.fill_plain(key, text, ttl)
            return (entity, gen, fresh)

        cv = self.regions.l1.get_or_create(key, create)
        if loaded:
            return loaded[0]
        result: Q = codec.from_l1(cv[2])
        return result

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
        self.coherence.invalidate((c.entity, c.ident, c.action) for c in changes)

    def invalidate_all(self) -> None:
        """Void every cached value of this key prefix, in every process."""
        self.coherence.invalidate_all()

    def _ping(self) -> None:
        if self._probe_client is not None:
            self._probe_client.ping()

    # -- manual and metrics ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters (hits / misses per level, fills, invalidations, broadcast
        lag), ``hit_ratio``, and the state of breaker, subscription and L1."""
        data = self.stats_counters.as_dict()
        data["breaker"] = self.breaker.state
        data["breaker_opened"] = self.breaker.opened
        data["subscribed"] = self.coherence.ready
        data["l1_entries"] = len(self.l1)
        data["l1_max_entries"] = self.l1.max_entries
        data["fills_dropped"] = self._filler.dropped
        return data


def _is_not_none(value: Any) -> bool:
    return value is not None
