"""The read-through paths of the cache: a row by id, a query result, each
through L1, then L2, then PostgreSQL, under the rules of the transaction's
:class:`~orchestrator_data.cache.views.ReadView` (when the cache may be used,
the fence, one committed state per read-only unit of work).

A mixin of :class:`~orchestrator_data.cache.layer.Cache`, which builds the
parts named below; kept apart so that the hot paths read as one piece.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dogpile.cache.api import NO_VALUE
from sqlalchemy.engine import Result
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.orm import Session as OrmSession

from orchestrator_data.cache import serialization
from orchestrator_data.cache.backends import LRUBackend
from orchestrator_data.cache.breaker import CLOSED, CircuitBreaker
from orchestrator_data.cache.coherence import Coherence
from orchestrator_data.cache.keys import Keys, digest
from orchestrator_data.cache.l2 import L2, MOVED
from orchestrator_data.cache.query_codecs import QueryCodec
from orchestrator_data.cache.regions import CacheRegions
from orchestrator_data.cache.serialization import Row, RowCodec
from orchestrator_data.cache.stats import CacheStats
from orchestrator_data.cache.views import SNAPSHOT_LEVELS, ReadView
from orchestrator_data.capture.change_capture import has_written
from orchestrator_data.capture.session_info import INFO_ISOLATION, INFO_READ_ONLY
from orchestrator_data.models import Base

#: ``Session.info`` key of the transaction's :class:`ReadView` (its fence and
#: what it served), set by ``Cache.after_transaction_create``.
INFO_FENCE = "orchestrator_data.cache.fence"

ModelT = TypeVar("ModelT", bound=Base)
Q = TypeVar("Q")


class ReadThrough:
    """``get_row`` and ``get_query`` (the parts come from the Cache)."""

    stats_counters: CacheStats
    coherence: Coherence
    breaker: CircuitBreaker
    keys: Keys
    codecs: dict[str, RowCodec[Any]]
    l1: LRUBackend
    regions: CacheRegions
    l2_ops: L2
    _l2_ttl: dict[str, float]

    def _gen_for(
        self, session: OrmSession, view: ReadView | None, entity: str, cached: bool | None
    ) -> int | None:
        """The fence's generation of ``entity`` if this read may use the
        cache, else None. ``cached``: None = the unit of work decides (read-only
        ones use the cache), True / False = the caller does."""
        if view is None or view.fence is None:
            return None
        info = session.info
        read_only = info.get(INFO_READ_ONLY)
        if view.checked is None:
            # Decided at the first read: the unit of work sets its flags
            # after its transaction was created.
            view.checked = bool(read_only) and info.get(INFO_ISOLATION) in SNAPSHOT_LEVELS
        if cached is None:
            if not read_only:
                return None
        elif not cached:
            return None
        if not self.coherence.ready or self.breaker._state != CLOSED:
            return None
        if not read_only and (
            has_written(session) or session.new or session.deleted or session.dirty
        ):
            # The transaction has written (or is about to, at the next
            # autoflush): its reads must see its own writes, from PostgreSQL.
            return None
        return view.fence.get(entity)

    def _read_database(self, view: ReadView | None, read: Callable[[], Q]) -> Q:
        """``read()`` from PostgreSQL, then the view's check of its snapshot."""
        self.stats_counters.bypassed += 1
        result = read()
        if view is not None and view.checked and not view.verified:
            view.database_read(self.coherence.generations, self.stats_counters)
        return result

    def do_orm_execute(self, state: ORMExecuteState) -> Result[Any] | None:
        """Session hook (``do_orm_execute``) for statements run outside the
        repositories' cached reads (``uow.session.execute(select(...))``,
        uncached entities): in a read-only unit of work that has served
        something from the cache and not yet checked its snapshot, the
        statement runs here and the check follows, as after the cache's own
        database reads. Otherwise it costs one lookup and does nothing."""
        view: ReadView | None = state.session.info.get(INFO_FENCE)
        if view is None or view.verified or not view.served:
            return None
        result = state.invoke_statement()
        view.database_read(self.coherence.generations, self.stats_counters)
        return result

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
        view: ReadView | None = session.info.get(INFO_FENCE)
        gen = self._gen_for(session, view, entity, cached)
        if gen is None:
            return self._read_database(view, lambda: session.get(model, ident))
        assert view is not None
        checked = view.checked
        codec: RowCodec[ModelT] = self.codecs[entity]
        # L1 keys rows by (entity, id as int): no string formatting and no
        # Python-level UUID.__hash__ on a hit.
        local = (entity, ident.int)
        found = self.l1.get(local)  # type: ignore[arg-type]
        if found is not NO_VALUE:
            payload = found.payload
            # A checked view takes an entry filled at or before its fence: the
            # row as of the fence (any change since would have dropped it).
            if not checked or payload[1] <= gen:
                stats.l1_hits += 1
                if checked:
                    view.served.add(entity)
                return codec.hydrate(payload[2])
        stats.l1_misses += 1
        key = self.keys.entity(entity, ident)
        if checked and self.coherence.generations.get(entity) != gen:
            # Changed since the fence: L2 may hold the row after the change.
            # The database read below still tries its (fenced) fills, which
            # the guards refuse.
            view.moved(entity, stats)
        else:
            # L2 outside the lock: an L2 hit costs one round trip and no locking.
            row = self.l2_ops.read_row(codec, key, ident, gen if checked else None)
            if row is MOVED:
                view.moved(entity, stats, in_redis=True)
            elif row is not None:
                assert isinstance(row, tuple)
                self.regions.l1.set(local, (entity, gen, row))  # type: ignore[arg-type]
                if checked:
                    view.served.add(entity)
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
            if checked and not view.verified:
                view.database_read(self.coherence.generations, stats)
            return loaded[0]
        if value is None:
            return None
        if checked:
            if value[1] > gen:
                # Another transaction's read, filled after a commit our
                # fence predates.
                view.moved(entity, stats)
                return self._read_database(view, lambda: session.get(model, ident))
            view.served.add(entity)
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
        view: ReadView | None = session.info.get(INFO_FENCE)
        gen = self._gen_for(session, view, entity, cached)
        if gen is None:
            return self._read_database(view, load)
        assert view is not None
        key = self.keys.query(entity, gen, digest(*parts))
        return self._through(view, key, entity, gen, load, codec, self._l2_ttl["query"])

    def _through(
        self,
        view: ReadView,
        key: str,
        entity: str,
        gen: int,
        load: Callable[[], Q],
        codec: QueryCodec[Q],
        ttl: float,
    ) -> Q:
        stats = self.stats_counters
        checked = view.checked
        found = self.l1.get(key)
        if found is not NO_VALUE:
            # The key carries the fence's generation: the result as of the fence.
            stats.l1_hits += 1
            if checked:
                view.served.add(entity)
            return codec.from_l1(found.payload[2])
        if checked and self.coherence.generations.get(entity) != gen:
            view.moved(entity, stats)
            return self._read_database(view, load)
        stats.l1_misses += 1
        frozen = self.l2_ops.read_value(key, codec)
        if frozen is not NO_VALUE:
            self.regions.l1.set(key, (entity, gen, frozen))
            if checked:
                view.served.add(entity)
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
            if checked and not view.verified:
                view.database_read(self.coherence.generations, stats)
            return loaded[0]
        if checked:
            view.served.add(entity)
        result: Q = codec.from_l1(cv[2])
        return result


def _is_not_none(value: Any) -> bool:
    return value is not None
