"""The multi-level cache through the public API: read-through, the
consistency rules (when the cache is used, invalidation after commit only,
rollback, savepoints, bulk statements, cascades, the stale-fill race),
manual invalidation, and the statistics."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import event, text, update

from orchestrator_data import DataLayer, UnitOfWork
from orchestrator_data.models import Agent, Task


@pytest.fixture
def dl(data_layer: DataLayer) -> DataLayer:
    assert data_layer.cache.wait_ready()
    return data_layer


@pytest.fixture
def raw_redis(dl: DataLayer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(dl.settings.redis_url or "")
    yield client
    client.close()


def make_agent(dl: DataLayer, **fields: Any) -> uuid.UUID:
    with dl.unit_of_work() as uow:
        agent = uow.agents.create(
            name=fields.pop("name", f"agent-{uuid.uuid4().hex[:8]}"),
            role=fields.pop("role", "planner"),
            capabilities=fields.pop("capabilities", ["plan"]),
            metadata=fields.pop("metadata", {"tier": 1}),
            **fields,
        )
        uow.commit()
        return agent.id


def read(dl: DataLayer, ident: uuid.UUID) -> Agent:
    with dl.unit_of_work(read_only=True) as uow:
        agent = uow.agents.get(ident)
        assert agent is not None
        return agent


def stat(dl: DataLayer, name: str) -> Any:
    return dl.cache.stats()[name]


def row_key(dl: DataLayer, entity: str, ident: uuid.UUID) -> str:
    return dl.cache.keys.entity(entity, ident)


def test_read_only_units_of_work_read_through_l1_and_l2(
    dl: DataLayer, raw_redis: redis.Redis
) -> None:
    ident = make_agent(dl, name="reader", metadata={"tier": 1})
    loads = stat(dl, "loads")
    first = read(dl, ident)
    dl.cache.wait_for_fills()
    assert stat(dl, "loads") == loads + 1
    assert raw_redis.exists(row_key(dl, "agent", ident))
    hits = stat(dl, "l1_hits")
    second = read(dl, ident)
    assert stat(dl, "l1_hits") == hits + 1
    assert stat(dl, "loads") == loads + 1
    assert (second.id, second.name, second.metadata_) == (first.id, "reader", {"tier": 1})
    assert second.created_at == first.created_at and second.created_at.tzinfo is not None
    # A cached row is the caller's own copy.
    second.metadata_["tier"] = 99
    second.capabilities.append("mutated")
    third = read(dl, ident)
    assert third.metadata_ == {"tier": 1}
    assert third.capabilities == ["plan"]


def test_l2_serves_a_process_whose_l1_is_empty(dl: DataLayer) -> None:
    ident = make_agent(dl, name="l2-reader")
    read(dl, ident)
    dl.cache.wait_for_fills()
    with dl.cache.l1.lock:
        dl.cache.l1.clear_locked()
    l2_hits, loads = stat(dl, "l2_hits"), stat(dl, "loads")
    assert read(dl, ident).name == "l2-reader"
    assert (stat(dl, "l2_hits"), stat(dl, "loads")) == (l2_hits + 1, loads)


def test_read_write_units_of_work_read_postgresql(dl: DataLayer) -> None:
    ident = make_agent(dl)
    read(dl, ident)  # cached now
    with dl.unit_of_work() as uow:
        bypassed = stat(dl, "bypassed")
        agent = uow.agents.get(ident)
        assert agent is not None and agent in uow.session  # the session's own instance
        assert stat(dl, "bypassed") == bypassed + 1
        # An explicit cached read is served from the cache...
        hits = stat(dl, "l1_hits")
        uow.agents.get(ident, cached=True)
        assert stat(dl, "l1_hits") == hits + 1
        # ... until the transaction has written.
        uow.agents.update(ident, status="busy")
        hits = stat(dl, "l1_hits")
        assert uow.agents.get(ident, cached=True).status == "busy"  # type: ignore[union-attr]
        assert stat(dl, "l1_hits") == hits


def test_for_update_and_cached_false_never_use_the_cache(dl: DataLayer) -> None:
    ident = make_agent(dl)
    read(dl, ident)
    with dl.unit_of_work(read_only=True) as uow:
        hits = stat(dl, "l1_hits")
        assert uow.agents.get(ident, cached=False) in uow.session
        assert stat(dl, "l1_hits") == hits
    with dl.unit_of_work() as uow:
        locked = uow.agents.get(ident, for_update=True)
        assert locked is not None and locked in uow.session
        assert stat(dl, "l1_hits") == hits


def test_a_commit_invalidates_rows_and_queries(dl: DataLayer, raw_redis: redis.Redis) -> None:
    ident = make_agent(dl, role="coder")
    with dl.unit_of_work(read_only=True) as uow:
        assert uow.agents.get(ident).status == "idle"  # type: ignore[union-attr]
        assert uow.agents.count(role="coder") == 1
        assert [a.id for a in uow.agents.by_role("coder")] == [ident]
    dl.cache.wait_for_fills()
    assert raw_redis.exists(row_key(dl, "agent", ident))
    with dl.unit_of_work() as uow:
        uow.agents.update(ident, status="busy")
        uow.agents.create(name="second-coder", role="coder")
        uow.commit()
    assert not raw_redis.exists(row_key(dl, "agent", ident))
    with dl.unit_of_work(read_only=True) as uow:
        assert uow.agents.get(ident).status == "busy"  # type: ignore[union-attr]
        assert uow.agents.count(role="coder") == 2
        assert len(uow.agents.by_role("coder")) == 2


def test_rollback_leaves_the_cache_untouched(dl: DataLayer, raw_redis: redis.Redis) -> None:
    ident = make_agent(dl)
    read(dl, ident)
    dl.cache.wait_for_fills()
    before = dict(dl.cache.coherence.generations)
    invalidations = stat(dl, "invalidations")
    with dl.unit_of_work() as uow:
        uow.agents.update(ident, status="busy")
        uow.rollback()
    with dl.unit_of_work() as uow:
        uow.agents.update(ident, status="error")
        # leaving without commit rolls back
    assert stat(dl, "invalidations") == invalidations
    assert dl.cache.coherence.generations == before
    assert raw_redis.exists(row_key(dl, "agent", ident))
    hits = stat(dl, "l1_hits")
    assert read(dl, ident).status == "idle"
    assert stat(dl, "l1_hits") == hits + 1


def test_a_rolled_back_savepoint_invalidates_nothing(dl: DataLayer, raw_redis: redis.Redis) -> None:
    kept, other = make_agent(dl), make_agent(dl)
    read(dl, kept)
    read(dl, other)
    dl.cache.wait_for_fills()
    with dl.unit_of_work() as uow:
        savepoint = uow.session.begin_nested()
        uow.agents.update(kept, status="busy")
        savepoint.rollback()
        uow.agents.update(other, status="busy")
        uow.commit()
    assert raw_redis.exists(row_key(dl, "agent", kept))
    assert not raw_redis.exists(row_key(dl, "agent", other))
    assert read(dl, kept).status == "idle"
    assert read(dl, other).status == "busy"


def test_bulk_update_invalidates(dl: DataLayer) -> None:
    ids = [make_agent(dl, role="bulk") for _ in range(3)]
    for ident in ids:
        read(dl, ident)
    with dl.unit_of_work(read_only=True) as uow:
        assert uow.agents.count(status="offline") == 0
    with dl.unit_of_work() as uow:
        uow.session.execute(update(Agent).where(Agent.role == "bulk").values(status="offline"))
        uow.commit()
    assert {read(dl, ident).status for ident in ids} == {"offline"}
    with dl.unit_of_work(read_only=True) as uow:
        assert uow.agents.count(status="offline") == 3


def test_deleting_an_agent_voids_cached_tasks_that_pointed_at_it(dl: DataLayer) -> None:
    agent = make_agent(dl)
    with dl.unit_of_work() as uow:
        task = uow.tasks.create(type="t", payload={}, agent_id=agent)
        uow.commit()
    with dl.unit_of_work(read_only=True) as uow:
        assert uow.tasks.get(task.id).agent_id == agent  # type: ignore[union-attr]
        assert uow.tasks.count(agent_id=agent) == 1
    with dl.unit_of_work() as uow:
        uow.agents.delete(agent)
        uow.commit()
    with dl.unit_of_work(read_only=True) as uow:
        assert uow.tasks.get(task.id).agent_id is None  # type: ignore[union-attr]
        assert uow.tasks.count(agent_id=agent) == 0
        assert uow.agents.get(agent) is None


def test_search_and_lookups_by_name_and_key_are_cached_and_invalidated(dl: DataLayer) -> None:
    make_agent(dl, name="searchable-one", role="researcher")
    with dl.unit_of_work() as uow:
        uow.sessions.create(session_key="sess-1", user_id="u1")
        uow.commit()
    for _ in range(2):
        with dl.unit_of_work(read_only=True) as uow:
            assert [a.name for a in uow.agents.search("researcher")] == ["searchable-one"]
            assert uow.agents.get_by_name("searchable-one") is not None
            assert uow.sessions.get_by_key("sess-1").user_id == "u1"  # type: ignore[union-attr]
    with dl.unit_of_work() as uow:
        uow.agents.create(name="searchable-two", role="researcher")
        s = uow.sessions.get_by_key("sess-1")
        assert s is not None
        uow.sessions.update(s.id, user_id="u2")
        uow.commit()
    with dl.unit_of_work(read_only=True) as uow:
        assert len(uow.agents.search("researcher")) == 2
        assert uow.sessions.get_by_key("sess-1").user_id == "u2"  # type: ignore[union-attr]


def test_manual_invalidation(dl: DataLayer) -> None:
    ident = make_agent(dl)
    read(dl, ident)
    with dl.engine.begin() as conn:  # behind the data layer's back
        conn.execute(text("UPDATE agents SET status = 'error' WHERE id = :id"), {"id": ident})
    assert read(dl, ident).status == "idle"  # still cached, as documented
    with dl.unit_of_work(read_only=True) as uow:
        uow.agents.invalidate_caches()
    assert read(dl, ident).status == "error"
    with dl.engine.begin() as conn:
        conn.execute(text("UPDATE agents SET status = 'busy' WHERE id = :id"), {"id": ident})
    dl.cache.invalidate_all()
    assert read(dl, ident).status == "busy"


def test_a_stale_snapshot_never_refills_the_cache(dl: DataLayer, raw_redis: redis.Redis) -> None:
    """A reader whose snapshot predates a commit reads the old row from
    PostgreSQL after the commit's invalidation; it must not cache it."""
    ident = make_agent(dl)
    with dl.unit_of_work(read_only=True, isolation="REPEATABLE READ") as reader:
        reader.session.execute(text("SELECT 1"))  # the snapshot is taken here
        with dl.unit_of_work() as writer:
            writer.agents.update(ident, status="busy")
            writer.commit()
        refused = stat(dl, "fills_refused")
        assert reader.agents.get(ident).status == "idle"  # type: ignore[union-attr]
        dl.cache.wait_for_fills()
        assert stat(dl, "fills_refused") >= refused + 2  # L1 and L2 both refused
    assert not raw_redis.exists(row_key(dl, "agent", ident))
    assert read(dl, ident).status == "busy"


def test_a_load_overtaken_by_a_commit_is_not_cached(dl: DataLayer, raw_redis: redis.Redis) -> None:
    """The reader's SELECT runs before the writer commits, its fill after
    the writer's invalidation (ordered by a hook, not by timing)."""
    ident = make_agent(dl)
    loaded, committed = threading.Event(), threading.Event()
    reader_thread: list[int] = []

    def after_select(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.get_ident() in reader_thread and "FROM agents" in statement:
            loaded.set()
            assert committed.wait(30)

    event.listen(dl.engine, "after_cursor_execute", after_select)
    seen: list[str] = []

    def reader() -> None:
        reader_thread.append(threading.get_ident())
        with dl.unit_of_work(read_only=True, isolation="READ COMMITTED") as uow:
            seen.append(uow.agents.get(ident).status)  # type: ignore[union-attr]

    try:
        thread = threading.Thread(target=reader)
        thread.start()
        assert loaded.wait(30)
        with dl.unit_of_work() as writer:
            writer.agents.update(ident, status="busy")
            writer.commit()
        committed.set()
        thread.join(30)
    finally:
        event.remove(dl.engine, "after_cursor_execute", after_select)
    dl.cache.wait_for_fills()
    assert seen == ["idle"]
    assert not raw_redis.exists(row_key(dl, "agent", ident))
    assert read(dl, ident).status == "busy"


def test_fifty_threads_missing_one_key_make_one_query(make_data_layer: Any) -> None:
    dl: DataLayer = make_data_layer(pool_max=60, pool_min=1, warm_pool=False)
    assert dl.cache.wait_ready()
    ident = make_agent(dl)
    selects: list[str] = []
    lock = threading.Lock()

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM agents" in statement:
            with lock:
                selects.append(statement)

    barrier = threading.Barrier(50)
    names: list[str] = []

    def worker() -> None:
        with dl.unit_of_work(read_only=True, isolation="READ COMMITTED") as uow:
            uow.session.connection()
            barrier.wait()
            agent = uow.agents.get(ident)
            assert agent is not None
            with lock:
                names.append(agent.name)

    event.listen(dl.engine, "before_cursor_execute", count)
    try:
        threads = [threading.Thread(target=worker) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        event.remove(dl.engine, "before_cursor_execute", count)
    assert len(names) == 50 and len(set(names)) == 1
    assert len(selects) == 1


def test_stats_report_levels_breaker_and_ratio(dl: DataLayer) -> None:
    ident = make_agent(dl)
    read(dl, ident)
    read(dl, ident)
    stats = dl.cache.stats()
    for name in (
        "l1_hits",
        "l1_misses",
        "l2_hits",
        "l2_misses",
        "l1_fills",
        "l2_fills",
        "invalidations",
        "broadcast_lag_max",
        "breaker",
        "hit_ratio",
    ):
        assert name in stats
    assert stats["breaker"] == "closed"
    assert 0 < stats["hit_ratio"] <= 1


def test_task_rows_round_trip_through_l2(dl: DataLayer) -> None:
    with dl.unit_of_work() as uow:
        task = uow.tasks.create(type="t", payload={"nested": {"a": [1, 2]}}, priority=7)
        uow.commit()
    with dl.unit_of_work(read_only=True) as uow:
        first = uow.tasks.get(task.id)
    dl.cache.wait_for_fills()
    with dl.cache.l1.lock:
        dl.cache.l1.clear_locked()
    with dl.unit_of_work(read_only=True) as uow:
        second = uow.tasks.get(task.id)
    assert isinstance(second, Task) and first is not None
    assert {c: getattr(second, c) for c in ("id", "payload", "priority", "status", "result")} == {
        c: getattr(first, c) for c in ("id", "payload", "priority", "status", "result")
    }
    assert second.created_at == first.created_at


def test_existing_uow_tests_still_see_their_writes(uow: UnitOfWork) -> None:
    agent = uow.agents.create(name="in-tx", role="r")
    assert uow.agents.get(agent.id, cached=True) is agent


def test_l1_never_outlives_l2(make_data_layer: Any) -> None:
    dl: DataLayer = make_data_layer(l1_ttl=10_000_000.0, pool_min=1, warm_pool=False)
    ttls = dl.settings.ttls
    ident = uuid.uuid4()
    assert dl.cache._l1_ttl_for(("agent", ident.int)) == ttls.agent_state
    assert dl.cache._l1_ttl_for(("task", ident.int)) == ttls.task_result
    assert dl.cache._l1_ttl_for(("session", ident.int)) == ttls.session
    assert dl.cache._l1_ttl_for(dl.cache.keys.query("agent", 1, "h")) == ttls.query
    short: DataLayer = make_data_layer(l1_ttl=5.0, pool_min=1, warm_pool=False)
    assert short.cache._l1_ttl_for(("task", ident.int)) == 5.0
