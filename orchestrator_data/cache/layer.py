"""The multi-level cache of one DataLayer: L1 (in-process LRU) -> L2 (Redis)
-> PostgreSQL, invalidated after commit, coherent across processes.

How a read stays correct (see docs/caching.md for the user's version):

- *When*: only read-only units of work and explicit ``cached=True`` reads
  use the cache, never once the transaction has written, never for
  ``FOR UPDATE``. A read-write SERIALIZABLE unit of work reads PostgreSQL, so
  SSI still sees every read it makes.
- *Fences*: when a transaction begins (before its first statement, hence
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
from typing import Any, Generic, Protocol, TypeVar, cast

import redis as redis_lib
from dogpile.cache.api import NO_VALUE, CachedValue
from redis import Redis
from sqlalchemy.orm import Session as OrmSession

from orchestrator_data.cache import scripts, serialization
from orchestrator_data.cache.backends import LRUBackend, RedisBackend
from orchestrator_data.cache.breaker import CLOSED, CircuitBreaker, Unavailable
from orchestrator_data.cache.broadcast import Subscriber
from orchestrator_data.cache.filler import Filler
from orchestrator_data.cache.invalidation import Targets, targets
from orchestrator_data.cache.keys import Keys, digest
from orchestrator_data.cache.regions import CacheRegions
from orchestrator_data.cache.serialization import Row, RowCodec
from orchestrator_data.cache.stats import CacheStats
from orchestrator_data.changes import has_written
from orchestrator_data.config import Settings
from orchestrator_data.models import Achievement, Agent, Base, Session, Task

log = logging.getLogger("orchestrator_data.cache")

#: ``Session.info`` keys.
INFO_CACHE = "orchestrator_data.cache"
INFO_FENCE = "orchestrator_data.cache.fence"
INFO_READ_ONLY = "orchestrator_data.read_only"  # set by the unit of work

ENTITIES = ("agent", "task", "session", "achievement")
ROW_MODELS: dict[str, type[Base]] = {"agent": Agent, "task": Task, "session": Session}

ModelT = TypeVar("ModelT", bound=Base)
Q = TypeVar("Q")
Fence = dict[str, "int | None"]


class QueryCodec(Protocol[Q]):
    """How a query result is cached: an immutable L1 form and a JSON form."""

    def to_l1(self, value: Q) -> Any: ...
    def from_l1(self, frozen: Any) -> Q: ...
    def to_json(self, frozen: Any) -> Any: ...
    def from_json(self, data: Any) -> Any: ...


class ScalarCodec:
    """A JSON scalar (a count, a sum): immutable as it is."""

    def to_l1(self, value: Any) -> Any:
        return value

    def from_l1(self, frozen: Any) -> Any:
        return frozen

    def to_json(self, frozen: Any) -> Any:
        return frozen

    def from_json(self, data: Any) -> Any:
        if not isinstance(data, (int, float, str)) or isinstance(data, bool):
            raise ValueError("malformed cached scalar")
        return data


class RowsCodec(Generic[ModelT]):
    """A list of model rows and an optional page cursor."""

    def __init__(self, codec: RowCodec[ModelT]) -> None:
        self.codec = codec

    def to_l1(self, value: tuple[Sequence[ModelT], str | None]) -> Any:
        items, cursor = value
        return tuple(self.codec.from_instance(o) for o in items), cursor

    def from_l1(self, frozen: Any) -> tuple[list[ModelT], str | None]:
        rows, cursor = frozen
        return [self.codec.hydrate(r) for r in rows], cursor

    def to_json(self, frozen: Any) -> Any:
        rows, cursor = frozen
        return [serialization.rows_to_json(self.codec, rows), cursor]

    def from_json(self, data: Any) -> Any:
        if not isinstance(data, list) or len(data) != 2:
            raise ValueError("malformed cached rows")
        cursor = data[1]
        if cursor is not None and not isinstance(cursor, str):
            raise ValueError("malformed cached cursor")
        return serialization.rows_from_json(self.codec, data[0]), cursor


SCALAR = ScalarCodec()


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
        self.origin = uuid.uuid4().hex
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
            "stats": ttls.metrics,
        }
        # L1 never keeps a value longer than L2 would.
        self._l1_ttl = {kind: min(s.l1_ttl, ttl) for kind, ttl in self._l2_ttl.items()}
        # Counters outlive every key built from them.
        self._counter_ttl_ms = int(max(self._l2_ttl.values()) * 2000)
        self._gens: Fence = dict.fromkeys(ENTITIES)
        self._ready = False
        self._lost = False
        self._closed = False
        self.client: Redis | None = client
        self._probe_client: Redis | None = None
        self.breaker = CircuitBreaker(
            probe=self._ping,
            on_recover=self._recover,
            on_state_change=self._breaker_changed,
            probe_interval=s.cache_probe_interval,
            slow_call=s.cache_slow_call,
        )
        self.regions = regions or CacheRegions.declare()
        self.regions.configure(
            l1={
                "max_entries": s.l1_max_entries,
                "ttl_for": self._l1_ttl_for,
                "admit": self._admit,
            },
            l2={"client": client, "breaker": self.breaker, "ttl_for": self._l2_ttl_for},
        )
        self.l1: LRUBackend = cast(LRUBackend, self.regions.l1.backend)
        self.l2: RedisBackend | None = (
            cast(RedisBackend, self.regions.l2.backend) if client is not None else None
        )
        self._filler = Filler(client, self.breaker, max_pending=s.cache_fill_queue)
        self._subscriber: Subscriber | None = None
        if self.enabled and client is not None:
            self._bump_script = client.register_script(scripts.BUMP)
            self._read_script = client.register_script(scripts.READ_COUNTERS)

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
            on_message=self._on_message,
            on_up=self._on_up,
            on_down=self._on_down,
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
        self._ready = False
        self.breaker.stop()
        if self._subscriber is not None:
            self._subscriber.stop()
        self._filler.stop()
        if self._probe_client is not None:
            self._probe_client.close()

    @property
    def usable(self) -> bool:
        """Whether reads may use the cache right now."""
        return self._ready and self.breaker.closed

    # -- session hooks ---------------------------------------------------------

    def after_begin(self, session: OrmSession, transaction: Any, connection: Any) -> None:
        # Before the transaction's first statement, so before its snapshot:
        # every generation recorded here belongs to a commit the snapshot sees.
        if getattr(transaction, "nested", False):
            return
        usable = self._ready and self.breaker.allow()
        session.info[INFO_FENCE] = dict(self._gens) if usable else None

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
        if fence is None or not self._ready or self.breaker._state != CLOSED:
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
        row = self._l2_row(codec, key)
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
            self._fill_row(codec, key, gen, loaded_row)
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

    def get_stats(
        self,
        session: OrmSession,
        source: str,
        key_entity: str,
        ident: uuid.UUID,
        load: Callable[[], Q],
        *,
        cached: bool | None = None,
    ) -> Q:
        """Read-through aggregate under ``cache:stats:{key_entity}:{id}``,
        computed from ``source`` rows: valid while ``source``'s generation is
        the one it was computed under."""
        fence = self.fence_for(session, cached)
        gen = fence.get(source) if fence is not None else None
        if gen is None or self._gens.get(source) != gen:
            self.stats_counters.bypassed += 1
            return load()
        key = self.keys.stats(key_entity, ident)
        found = self.l1.get(key)
        if found is not NO_VALUE and found.payload[1] != gen:
            self.l1.delete(key)  # computed under another generation
        codec = cast("QueryCodec[Q]", SCALAR)
        return self._through(key, source, gen, load, codec, self._l2_ttl["stats"], stamp=True)

    def _through(
        self,
        key: str,
        entity: str,
        gen: int,
        load: Callable[[], Q],
        codec: QueryCodec[Q],
        ttl: float,
        *,
        stamp: bool = False,
    ) -> Q:
        stats = self.stats_counters
        found = self.l1.get(key)
        if found is not NO_VALUE:
            stats.l1_hits += 1
            return codec.from_l1(found.payload[2])
        stats.l1_misses += 1
        frozen = self._l2_value(key, codec, str(gen) if stamp else None)
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
            if stamp:
                text = f"{gen}|{text}"
            self._fill_plain(key, text, ttl)
            return (entity, gen, fresh)

        cv = self.regions.l1.get_or_create(key, create)
        if loaded:
            return loaded[0]
        result: Q = codec.from_l1(cv[2])
        return result

    # -- L2 ------------------------------------------------------------------------

    def _l2_row(self, codec: RowCodec[Any], key: str) -> Row | None:
        stats = self.stats_counters
        client = self.client
        assert client is not None
        epoch_key = self.keys.epoch(codec.entity)
        found = self.breaker.call(lambda: client.mget(key, epoch_key), None)
        if not found or found[0] is None or found[1] is None:
            stats.l2_misses += 1
            return None
        value, epoch = cast("tuple[bytes, bytes]", found)
        sep = value.find(b"|")
        if sep < 0 or value[:sep] != epoch:
            stats.l2_misses += 1  # written before the last epoch bump: void
            return None
        try:
            row = codec.loads(value[sep + 1 :])
        except ValueError:
            log.warning("ignoring a malformed cached %s at %s", codec.entity, key)
            stats.l2_misses += 1
            return None
        stats.l2_hits += 1
        return row

    def _l2_value(self, key: str, codec: QueryCodec[Any], stamp: str | None) -> Any:
        stats = self.stats_counters
        client = self.client
        assert client is not None
        raw = cast("bytes | None", self.breaker.call(lambda: client.get(key), None))
        if raw is None:
            stats.l2_misses += 1
            return NO_VALUE
        if stamp is not None:
            head, _, raw = raw.partition(b"|")
            if head.decode() != stamp:
                stats.l2_misses += 1
                return NO_VALUE
        try:
            frozen = codec.from_json(serialization.loads(raw))
        except ValueError:
            log.warning("ignoring a malformed cached value at %s", key)
            stats.l2_misses += 1
            return NO_VALUE
        stats.l2_hits += 1
        return frozen

    def _fill_row(self, codec: RowCodec[Any], key: str, gen: int, row: Row) -> None:
        entity = codec.entity
        stats = self.stats_counters

        def on_reply(written: Any) -> None:
            if written:
                stats.l2_fills += 1
            else:
                stats.fills_refused += 1

        self._filler.submit(
            on_reply,
            "EVAL",
            scripts.FILL_ENTITY,
            3,
            key,
            self.keys.generation(entity),
            self.keys.epoch(entity),
            str(gen),
            codec.dumps(row),
            int(self._l2_ttl[entity] * 1000),
            self._counter_ttl_ms,
        )

    def _fill_plain(self, key: str, text: str, ttl: float) -> None:
        stats = self.stats_counters

        def on_reply(_: Any) -> None:
            stats.l2_fills += 1

        self._filler.submit(on_reply, "SET", key, text, "PX", int(ttl * 1000))

    # -- L1 --------------------------------------------------------------------------

    def _kind(self, key: str | tuple[str, int]) -> str:
        if isinstance(key, tuple):
            return key[0]
        return key[len(self.keys.prefix) + 6 :].split(":", 1)[0]

    def _l1_ttl_for(self, key: str | tuple[str, int]) -> float:
        return self._l1_ttl.get(self._kind(key), self.settings.l1_ttl)

    def _l2_ttl_for(self, key: str) -> float:
        return self._l2_ttl.get(self._kind(key), self._l2_ttl["query"])

    def _admit(self, key: str, value: Any) -> bool:
        # Runs under the L1 lock: an invalidation (which bumps the local
        # generation under the same lock) either happened before, and the
        # fill is refused, or happens after, and deletes what was filled.
        payload = value.payload if isinstance(value, CachedValue) else None
        if not (isinstance(payload, tuple) and len(payload) == 3):
            return False
        entity, gen, _ = payload
        if self._ready and gen is not None and self._gens.get(entity) == gen:
            self.stats_counters.l1_fills += 1
            return True
        self.stats_counters.fills_refused += 1
        return False

    def _drop_entity_rows_locked(self, entities: Iterable[str]) -> None:
        wanted = set(entities)
        if wanted:
            self.l1.discard_locked(
                [k for k in self.l1.keys_locked() if isinstance(k, tuple) and k[0] in wanted]
            )

    # -- invalidation ----------------------------------------------------------------

    def invalidate(self, items: Iterable[tuple[str, uuid.UUID | None, str]]) -> None:
        """Invalidate after a commit: ``(entity, id, action)`` items, ``id``
        None for "every row". Drops the L1 keys, deletes the L2 keys, bumps
        the generations (and epochs for cascades), broadcasts to the other
        processes. Never raises: if Redis is unreachable the breaker opens and
        the repair runs when it comes back."""
        if not self.enabled:
            return
        t = targets(items)
        if t:
            self._apply(t, everything=False)

    def on_commit(self, session: OrmSession, changes: Sequence[Any]) -> None:
        """Change-capture subscriber: invalidate what a committed transaction
        changed (``Change.entity`` / ``.ident`` / ``.action``)."""
        self.invalidate((c.entity, c.ident, c.action) for c in changes)

    def invalidate_all(self) -> None:
        """Void every cached value of this key prefix, in every process."""
        if not self.enabled:
            return
        t = Targets(generations=set(ENTITIES), epochs=set(ROW_MODELS))
        self._apply(t, everything=True)

    def _apply(self, t: Targets, *, everything: bool) -> None:
        rows = sorted(t.rows, key=str)
        row_keys = [self.keys.entity(e, i) for e, i in rows]
        gens = sorted(t.generations)
        epochs = sorted(t.epochs)
        with self.l1.lock:
            if everything:
                self.l1.clear_locked()
            else:
                self.l1.discard_locked([(e, i.int) for e, i in rows])
                self._drop_entity_rows_locked(epochs)
            # Until Redis answers with the new values, no fill of these
            # entities is admitted.
            for e in gens:
                self._gens[e] = None
        self.stats_counters.invalidations += len(row_keys) + len(gens)
        try:
            values = self.breaker.execute(
                lambda: self._bump(row_keys, rows, gens, epochs, everything)
            )
        except Unavailable:
            self._lost = True
            self.stats_counters.invalidations_lost += 1
            return
        self.stats_counters.broadcasts_sent += 1
        self._merge_generations(gens, values)

    def _bump(
        self,
        row_keys: list[str],
        rows: list[tuple[str, uuid.UUID]],
        gens: list[str],
        epochs: list[str],
        everything: bool,
    ) -> list[int]:
        counters = [self.keys.generation(e) for e in gens] + [self.keys.epoch(e) for e in epochs]
        message = {
            "o": self.origin,
            "t": time.time(),
            "r": [[e, str(i)] for e, i in rows],
            "g": gens,
            "e": epochs,
            "all": everything,
        }
        head = serialization.dumps(message)
        head = head[:-1] + ',"v":'
        result = self._bump_script(
            keys=counters + row_keys,
            args=[len(counters), self._counter_ttl_ms, self.keys.channel, head],
        )
        return [int(v) for v in result]

    def _merge_generations(self, entities: Sequence[str], values: Sequence[Any]) -> None:
        with self.l1.lock:
            for e, v in zip(entities, values):  # noqa: B905 - values may carry epochs after
                current = self._gens.get(e)
                self._gens[e] = max(int(v), current or 0)

    # -- broadcast -------------------------------------------------------------------

    def _on_message(self, message: dict[str, Any]) -> None:
        if message.get("o") == self.origin:
            return  # applied locally before it was published
        sent = message.get("t")
        if isinstance(sent, (int, float)):
            self.stats_counters.observe_lag(max(0.0, time.time() - sent))
        with self.l1.lock:
            if message.get("all"):
                self.l1.clear_locked()
            else:
                self.l1.discard_locked(_row_keys(message.get("r")))
                self._drop_entity_rows_locked(
                    [e for e in message.get("e", ()) if isinstance(e, str)]
                )
        self._merge_generations(list(message.get("g", ())), list(message.get("v", ())))

    def _on_up(self) -> None:
        values = self._read_counters()
        with self.l1.lock:
            self.l1.clear_locked()
            for e, v in zip(ENTITIES, values):  # noqa: B905
                self._gens[e] = max(v, self._gens.get(e) or 0)
            self._ready = True
        self.stats_counters.l1_flushes += 1

    def _on_down(self) -> None:
        # Invalidations published from now on may never reach us: stop
        # trusting L1 until resubscribed (and flushed).
        with self.l1.lock:
            self._ready = False
            self.l1.clear_locked()
            for e in ENTITIES:
                self._gens[e] = None
        self.stats_counters.l1_flushes += 1

    def _read_counters(self) -> list[int]:
        client = self.client
        assert client is not None
        keys = [self.keys.generation(e) for e in ENTITIES]
        return [int(v) for v in self._read_script(keys=keys, args=[self._counter_ttl_ms])]

    # -- breaker -----------------------------------------------------------------------

    def _ping(self) -> None:
        if self._probe_client is not None:
            self._probe_client.ping()

    def _recover(self) -> None:
        # Runs in the probe thread with the breaker still open. Invalidations
        # that failed while Redis was away are repaired wholesale: every
        # generation and epoch is bumped (published to every process), so no
        # value cached before can be served again.
        if self._lost:
            self._lost = False
            try:
                values = self._bump([], [], list(ENTITIES), list(ROW_MODELS), True)
            except BaseException:
                self._lost = True
                raise
            with self.l1.lock:
                self.l1.clear_locked()
            self._merge_generations(ENTITIES, values)
        else:
            self._merge_generations(ENTITIES, self._read_counters())

    def _breaker_changed(self, state: str) -> None:
        if state == CLOSED and self._lost:
            # An invalidation failed after the repair ran: repair again.
            self.breaker.trip("an invalidation is still to be repaired")

    # -- manual and metrics ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters (hits / misses per level, fills, invalidations, broadcast
        lag), ``hit_ratio``, and the state of breaker, subscription and L1."""
        data = self.stats_counters.as_dict()
        data["breaker"] = self.breaker.state
        data["breaker_opened"] = self.breaker.opened
        data["subscribed"] = self._ready
        data["l1_entries"] = len(self.l1)
        data["l1_max_entries"] = self.l1.max_entries
        data["fills_dropped"] = self._filler.dropped
        return data


def _row_keys(pairs: Any) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for pair in pairs if isinstance(pairs, list) else ():
        try:
            out.append((str(pair[0]), uuid.UUID(pair[1]).int))
        except (TypeError, ValueError, IndexError):
            log.warning("ignoring a malformed key in a cache invalidation message")
    return out


def _is_not_none(value: Any) -> bool:
    return value is not None
