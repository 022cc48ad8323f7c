"""Achievements: rules award from task outcomes, idempotently (even
concurrently), audited; points and leaderboard cached in Redis."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest

from fixtures.concurrency import run_threads
from orchestrator_data import Actor, ConflictError, DataLayer, UnitOfWork
from orchestrator_data.achievements.awards import Awards, agent_record, award
from orchestrator_data.models import Achievement


def _agent(dl: DataLayer, name: str = "worker") -> uuid.UUID:
    with dl.unit_of_work() as uow:
        agent_id = uow.agents.create(name=name, role="r").id
        uow.commit()
    return agent_id


def _finish(dl: DataLayer, agent_id: uuid.UUID, *, ok: bool = True, took: float = 5.0) -> list[str]:
    """Run one task to completion (or failure) and evaluate the rules."""

    def fn(uow: UnitOfWork) -> list[str]:
        started = datetime.now(timezone.utc) - timedelta(seconds=took)
        task = uow.tasks.create(type="t", payload={}, agent_id=agent_id, started_at=started)
        done = uow.tasks.update(
            task.id,
            status="completed" if ok else "failed",
            completed_at=datetime.now(timezone.utc),
        )
        return [a.achievement_type for a in dl.awards.evaluate(uow, done)]

    return dl.run_in_transaction(fn, actor=Actor("agent", str(agent_id)))


def test_rules_award_milestones_streaks_and_fast_completions(data_layer: DataLayer) -> None:
    agent_id = _agent(data_layer)
    awarded = [_finish(data_layer, agent_id) for _ in range(4)]
    assert awarded == [["first_task"], [], [], []]
    assert _finish(data_layer, agent_id) == ["completion_streak"]  # 5 in a row
    assert _finish(data_layer, agent_id, ok=False) == []  # breaks the streak
    awarded = [_finish(data_layer, agent_id) for _ in range(5)]
    assert awarded == [[], [], [], [], ["tasks_10", "completion_streak"]]
    assert _finish(data_layer, agent_id, took=0.2) == ["fast_completion"]
    with data_layer.unit_of_work(read_only=True) as uow:
        record = agent_record(uow, agent_id)
        assert (record.completed, record.streak) == (11, 6)
        assert uow.achievements.points_of(agent_id) == 10 + 20 + 50 + 20 + 5
        rows = uow.audit.list(resource_type="achievement", limit=100).items
    assert [(r.new_value or {}).get("achievement_type") for r in rows] == [
        "first_task",
        "completion_streak",
        "tasks_10",
        "completion_streak",
        "fast_completion",
    ]
    assert all(r.action == "create" and r.actor_id == str(agent_id) for r in rows)


def test_evaluating_the_same_task_twice_awards_once(data_layer: DataLayer) -> None:
    agent_id = _agent(data_layer)
    _finish(data_layer, agent_id, took=0.1)
    with data_layer.unit_of_work() as uow:
        [task] = uow.tasks.list(agent_id=agent_id).items
        assert data_layer.awards.evaluate(uow, task) == []
        # Even forced past the "already held" check, the unique indexes refuse.
        assert award(uow, agent_id, "first_task", 10, {"task_id": str(task.id)}) is None
        assert award(uow, agent_id, "fast_completion", 5, {"task_id": str(task.id)}) is None
        uow.commit()
    with data_layer.unit_of_work(read_only=True) as uow:
        types = sorted(a.achievement_type for a in uow.achievements.list(agent_id=agent_id))
        assert types == ["fast_completion", "first_task"]
        # The refused inserts left no audit rows (their savepoints rolled back).
        assert uow.audit.count(resource_type="achievement") == 2


def test_duplicate_one_time_achievement_is_a_conflict(data_layer: DataLayer) -> None:
    agent_id = _agent(data_layer)
    with data_layer.unit_of_work() as uow:
        uow.achievements.create(agent_id=agent_id, achievement_type="tasks_100", points=250)
        with pytest.raises(ConflictError, match="award_once"):
            uow.achievements.create(agent_id=agent_id, achievement_type="tasks_100", points=250)


@pytest.mark.parametrize("isolation", ["SERIALIZABLE", "READ COMMITTED"])
def test_concurrent_awarding_yields_one_row(
    isolation: str, make_data_layer: Callable[..., DataLayer], data_layer: DataLayer
) -> None:
    dl = make_data_layer(pool_max=10, max_retries=50, retry_backoff_max=0.02)
    agent_id = _agent(dl)
    barrier = threading.Barrier(8)
    results: list[bool] = []
    first_attempt = threading.local()

    def give(uow: UnitOfWork) -> bool:
        uow.achievements.count(agent_id=agent_id)  # the transaction has its snapshot
        if not getattr(first_attempt, "done", False):
            first_attempt.done = True
            barrier.wait(timeout=10)  # all in flight before any inserts
        got = award(uow, agent_id, "first_task", 10, {"by": threading.get_ident()})
        return got is not None

    def worker(_: int) -> None:
        results.append(dl.run_in_transaction(give, isolation=isolation))

    assert run_threads(8, worker) == []
    with dl.unit_of_work(read_only=True) as uow:
        assert uow.achievements.count(agent_id=agent_id, achievement_type="first_task") == 1
        assert uow.audit.count(resource_type="achievement") == 1
    assert results.count(True) == 1


def test_points_and_leaderboard_are_cached_and_invalidated_on_commit(
    data_layer: DataLayer,
) -> None:
    a, b = _agent(data_layer, "alpha"), _agent(data_layer, "beta")
    stats = data_layer.stats
    redis = data_layer.redis
    assert stats.points_of(a) == 0
    assert redis.get(stats.agent_key(a)) == b"0"
    assert 0 < redis.ttl(stats.agent_key(a)) <= 3600
    assert stats.leaderboard() == []

    with data_layer.unit_of_work() as uow:
        award(uow, a, "first_task", 10, {})
        award(uow, b, "tasks_10", 50, {})
        assert stats.points_of(a) == 0  # not committed: the cache is untouched
        uow.commit()
    assert stats.points_of(a) == 10
    assert [(e.name, e.points) for e in stats.leaderboard()] == [("beta", 50), ("alpha", 10)]
    assert redis.get(stats.leaderboard_key())
    assert 0 < redis.ttl(stats.leaderboard_key()) <= 3600

    with data_layer.unit_of_work() as uow:
        award(uow, a, "tasks_100", 250, {})
        uow.rollback()
    assert stats.points_of(a) == 10

    # Points changed through a bulk statement invalidate too.
    from sqlalchemy import update

    with data_layer.unit_of_work() as uow:
        uow.session.execute(update(Achievement).where(Achievement.agent_id == a).values(points=99))
        uow.commit()
    assert stats.points_of(a) == 99
    assert [(e.name, e.points) for e in stats.leaderboard(limit=1)] == [("alpha", 99)]

    # Deleting the agent cascades its achievements away: invalidated as well.
    with data_layer.unit_of_work() as uow:
        uow.agents.delete(a)
        uow.commit()
    assert stats.points_of(a) == 0
    assert [e.name for e in stats.leaderboard()] == ["beta"]


def test_a_stale_reader_cannot_refill_an_invalidated_key(data_layer: DataLayer) -> None:
    a = _agent(data_layer)
    stats = data_layer.stats
    key = stats.agent_key(a)
    # A reader misses, notes the version, reads 0 from PostgreSQL ...
    value, version = stats._get(key)
    assert value is None
    # ... meanwhile an award commits and invalidates ...
    with data_layer.unit_of_work() as uow:
        award(uow, a, "first_task", 10, {})
        uow.commit()
    # ... then the reader tries to cache its stale 0: refused.
    stats._fill(key, version, b"0")
    assert data_layer.redis.get(key) is None
    assert stats.points_of(a) == 10
    assert data_layer.redis.get(key) == b"10"


def test_redis_down_does_not_break_reads_or_awards(
    make_data_layer: Callable[..., DataLayer], data_layer: DataLayer
) -> None:
    dl = make_data_layer(redis_url="redis://127.0.0.1:1/0", redis_max_retries=0)
    a = _agent(dl)
    with dl.unit_of_work() as uow:
        award(uow, a, "first_task", 10, {})
        uow.commit()  # invalidation fails softly after the commit
    assert dl.stats.points_of(a) == 10
    assert [(e.agent_id, e.points) for e in dl.stats.leaderboard()] == [(a, 10)]


def test_rules_must_match_the_unique_indexes() -> None:
    from orchestrator_data.achievements.awards import milestone

    with pytest.raises(ValueError, match="needs a migration"):
        Awards([milestone("tasks_1000", 500, 1000)])
