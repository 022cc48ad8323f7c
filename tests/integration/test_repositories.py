"""Repositories against a real PostgreSQL: CRUD, filters, pagination, search,
validation without partial writes, and error mapping."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from orchestrator_data import (
    ConflictError,
    DataLayer,
    NotFoundError,
    OrchestratorDataError,
    Page,
    UnitOfWork,
    ValidationError,
)
from orchestrator_data.models import Agent, Task


def test_create_get_update_delete_round_trip(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        agent = uow.agents.create(
            name="alpha", role="planner", capabilities=["plan"], metadata={"tier": 1}
        )
        uow.commit()
    with data_layer.unit_of_work() as uow:
        got = uow.agents.get_or_raise(agent.id)
        assert (got.name, got.role, got.status) == ("alpha", "planner", "idle")
        assert got.capabilities == ["plan"]
        assert uow.agents.dump(got)["metadata"] == {"tier": 1}
        assert got.created_at.tzinfo is not None
        before = got.updated_at
        uow.agents.update(agent.id, status="busy", metadata={"tier": 2})
        uow.commit()
    with data_layer.unit_of_work() as uow:
        got = uow.agents.get_or_raise(str(agent.id))
        assert got.status == "busy"
        assert got.metadata_ == {"tier": 2}
        assert got.updated_at > before
        uow.agents.delete(agent.id)
        uow.commit()
    with data_layer.unit_of_work() as uow:
        assert uow.agents.get(agent.id) is None
        with pytest.raises(NotFoundError):
            uow.agents.get_or_raise(agent.id)
        with pytest.raises(NotFoundError):
            uow.agents.update(agent.id, status="idle")


def test_bad_input_writes_nothing(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        uow.agents.create(name="keeper", role="r")
        for bad in (
            {"type": "t", "payload": {}, "priority": 0},
            {"type": "t", "payload": {}, "priority": 11},
            {"type": "t", "payload": {}, "status": "exploded"},
            {"type": "", "payload": {}},
            {"type": "t", "payload": "text"},
            {"type": "t", "payload": {}, "agent_id": "not-a-uuid"},
        ):
            with pytest.raises(ValidationError):
                uow.tasks.create(**bad)
        with pytest.raises(ValidationError) as info:
            uow.agents.create(name="x" * 300, role="r")
        assert info.value.fields == ["name"]
        with pytest.raises(ValidationError) as info:
            uow.agents.create(role="r")
        assert info.value.fields == ["name"]
        uow.commit()
    with data_layer.unit_of_work() as uow:
        assert uow.tasks.count() == 0
        assert uow.agents.count() == 1


def test_update_rejects_bad_fields_and_keeps_the_row(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        task = uow.tasks.create(type="t", payload={"a": 1}, priority=3)
        uow.commit()
    with data_layer.unit_of_work() as uow:
        with pytest.raises(ValidationError) as info:
            uow.tasks.update(task.id, priority=99, status="nope")
        assert info.value.fields == ["priority", "status"]
        with pytest.raises(ValidationError) as info:
            uow.tasks.update(task.id, id=uuid.uuid4())
        assert info.value.fields == ["id"]
        uow.commit()
    with data_layer.unit_of_work() as uow:
        fresh = uow.tasks.get_or_raise(task.id)
        assert (fresh.priority, fresh.status) == (3, "pending")


def test_non_uuid_id_is_a_validation_error(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        with pytest.raises(ValidationError) as info:
            uow.agents.get("42")
        assert info.value.fields == ["id"]


def test_duplicate_name_is_a_conflict_and_nothing_is_kept(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        uow.agents.create(name="dup", role="r")
        uow.commit()
    with pytest.raises(ConflictError) as info, data_layer.unit_of_work() as uow:
        uow.agents.create(name="other", role="r")
        uow.agents.create(name="dup", role="r")
        uow.commit()
    assert info.value.constraint == "uq_agents_name"
    assert "name" in str(info.value)
    with data_layer.unit_of_work() as uow:
        assert uow.agents.count() == 1  # "other" was rolled back with it


def test_session_key_is_unique(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        uow.sessions.create(session_key="k1", user_id="u")
        with pytest.raises(ConflictError):
            uow.sessions.create(session_key="k1", user_id="v")


def test_task_for_a_missing_agent_is_a_conflict(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow, pytest.raises(ConflictError):
        uow.tasks.create(type="t", payload={}, agent_id=uuid.uuid4())


def test_check_constraints_guard_direct_sql_too(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        task = uow.tasks.create(type="t", payload={})
        task.priority = 42  # bypasses the schema: the database still refuses
        with pytest.raises(ValidationError) as info:
            uow.session.flush()
        assert info.value.fields == ["priority"]


def test_agent_filters(data_layer: DataLayer, agent_factory: type) -> None:
    with data_layer.unit_of_work() as uow:
        uow.agents.create(name="a1", role="coder", status="busy", capabilities=["code", "test"])
        uow.agents.create(name="a2", role="coder", status="idle", capabilities=["code"])
        uow.agents.create(name="a3", role="planner", status="idle", capabilities=["plan", "test"])
        uow.commit()
    with data_layer.unit_of_work(read_only=True) as uow:

        def names(page: Page[Agent]) -> list[str]:
            return sorted(a.name for a in page)

        assert names(uow.agents.by_role("coder")) == ["a1", "a2"]
        assert names(uow.agents.by_status("idle")) == ["a2", "a3"]
        assert names(uow.agents.with_capability("test")) == ["a1", "a3"]
        assert names(uow.agents.with_capability("code", "test")) == ["a1"]
        assert names(uow.agents.list(role="coder", status="idle")) == ["a2"]
        assert uow.agents.count(role="coder") == 2
        assert uow.agents.get_by_name("a3") is not None
        with pytest.raises(ValidationError) as info:
            uow.agents.list(status="sleeping", colour="red")
        assert info.value.fields == ["colour", "status"]


def test_task_filters_and_priority_ranges(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        agent = uow.agents.create(name="w", role="worker")
        for p in range(1, 11):
            uow.tasks.create(
                type="even" if p % 2 == 0 else "odd",
                payload={"p": p},
                priority=p,
                agent_id=agent.id if p > 8 else None,
            )
        uow.commit()
    with data_layer.unit_of_work(read_only=True) as uow:
        assert sorted(t.priority for t in uow.tasks.by_priority(4, 6)) == [4, 5, 6]
        assert uow.tasks.count(type="even") == 5
        assert sorted(t.priority for t in uow.tasks.list(agent_id=agent.id)) == [9, 10]
        assert uow.tasks.count(status=["pending", "failed"]) == 10
        with pytest.raises(ValidationError):
            uow.tasks.list(priority_min=0)


def test_keyset_pagination_is_stable_and_complete(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        for i in range(23):
            uow.tasks.create(type="t", payload={"i": i}, priority=1 + i % 3)
        uow.commit()
    for order, desc in (("created_at", False), ("priority", True)):
        seen: list[uuid.UUID] = []
        cursor = None
        with data_layer.unit_of_work(read_only=True) as uow:
            while True:
                page = uow.tasks.list(limit=5, after=cursor, order_by=order, descending=desc)
                seen.extend(t.id for t in page)
                cursor = page.next_cursor
                if cursor is None:
                    break
            expected = list(
                uow.session.scalars(
                    select(Task.id).order_by(
                        getattr(Task, order).desc() if desc else getattr(Task, order),
                        Task.id.desc() if desc else Task.id,
                    )
                )
            )
        assert seen == expected
        assert len(set(seen)) == 23


def test_pagination_input_errors(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work(read_only=True) as uow:
        for kwargs, field in (
            ({"limit": 0}, "limit"),
            ({"order_by": "payload"}, "order_by"),
            ({"after": "garbage"}, "after"),
        ):
            with pytest.raises(ValidationError) as info:
                uow.tasks.list(**kwargs)
            assert field in info.value.fields


def test_full_text_search(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        uow.agents.create(name="ocean-researcher", role="oceanography")
        uow.agents.create(name="writer", role="poet")
        uow.tasks.create(type="summarize", payload={"title": "Quarterly revenue report", "n": 3})
        uow.tasks.create(type="translate", payload={"text": "bonjour le monde"})
        uow.commit()
    with data_layer.unit_of_work(read_only=True) as uow:
        assert [a.name for a in uow.agents.search("oceanography")] == ["ocean-researcher"]
        assert [t.type for t in uow.tasks.search("revenue")] == ["summarize"]
        assert [t.type for t in uow.tasks.search("translate")] == ["translate"]
        assert uow.tasks.search("nothing-like-this") == []
        with pytest.raises(ValidationError):
            uow.tasks.search("")


def test_claim_next_takes_highest_priority_oldest_first(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        agent = uow.agents.create(name="claimer", role="worker")
        low = uow.tasks.create(type="t", payload={}, priority=2)
        high1 = uow.tasks.create(type="t", payload={}, priority=9)
        high2 = uow.tasks.create(type="t", payload={}, priority=9)
        uow.commit()
    order = []
    for _ in range(4):
        claimed = data_layer.run_in_transaction(
            lambda u: (lambda t: t.id if t else None)(u.tasks.claim_next(agent.id))
        )
        order.append(claimed)
    assert order == [high1.id, high2.id, low.id, None]


def test_sessions_repository(data_layer: DataLayer) -> None:
    now = datetime.now(timezone.utc)
    with data_layer.unit_of_work() as uow:
        uow.sessions.create(
            session_key="live",
            user_id="u1",
            ip_address="10.1.2.3",
            expires_at=now + timedelta(hours=1),
        )
        uow.sessions.create(session_key="old", user_id="u1", expires_at=now - timedelta(minutes=1))
        uow.commit()
    with data_layer.unit_of_work() as uow:
        live = uow.sessions.get_by_key("live")
        assert live is not None and live.ip_address == "10.1.2.3"
        assert uow.sessions.count(user_id="u1") == 2
        assert [s.session_key for s in uow.sessions.list(expired=True)] == ["old"]
        assert uow.sessions.delete_expired() == 1
        uow.commit()
    with data_layer.unit_of_work() as uow:
        assert uow.sessions.get_by_key("old") is None


def test_achievement_points_and_leaderboard(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        a = uow.agents.create(name="ace", role="r")
        b = uow.agents.create(name="bee", role="r")
        uow.achievements.create(agent_id=a.id, achievement_type="first_task", points=10)
        uow.achievements.create(agent_id=a.id, achievement_type="ten_tasks", points=50)
        uow.achievements.create(agent_id=b.id, achievement_type="first_task", points=10)
        uow.commit()
    with data_layer.unit_of_work(read_only=True) as uow:
        assert uow.achievements.points_of(a.id) == 60
        assert uow.achievements.points_of(uuid.uuid4()) == 0
        assert [(name, pts) for _, name, pts in uow.achievements.leaderboard()] == [
            ("ace", 60),
            ("bee", 10),
        ]
        assert uow.achievements.count(agent_id=a.id) == 2


def test_audit_repository_is_read_only(uow: UnitOfWork, audit_log_factory: type) -> None:
    first = audit_log_factory(resource_type="agent", resource_id="r1", action="create")
    second = audit_log_factory(resource_type="agent", resource_id="r1", action="update")
    audit_log_factory(resource_type="task", resource_id="r2")
    history = uow.audit.history("agent", "r1")
    assert [r.id for r in history] == [first.id, second.id]
    assert uow.audit.count(action="update") == 2
    with pytest.raises(OrchestratorDataError):
        uow.audit.create(action="create")
    with pytest.raises(OrchestratorDataError):
        uow.audit.update(first.id, action="delete")
    with pytest.raises(OrchestratorDataError):
        uow.audit.delete(first.id)
