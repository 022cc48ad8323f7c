"""The audit trail: every write path through the package's session leaves
its audit rows, in the same transaction, with the right actor and values."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import CursorResult, delete, insert, text, update
from sqlalchemy.exc import DBAPIError

from fixtures.concurrency import increment, run_threads
from orchestrator_data import (
    Actor,
    DataLayer,
    UncapturedWriteError,
    UnitOfWork,
    acting_as,
    correlated,
)
from orchestrator_data.models import Agent, AuditLog, Task


def audit_rows(dl: DataLayer, resource_id: object | None = None, **filters: Any) -> list[AuditLog]:
    with dl.unit_of_work(read_only=True) as uow:
        if resource_id is not None:
            filters["resource_id"] = str(resource_id)
        return uow.audit.list(limit=1000, **filters).items


def obj(value: object) -> dict[str, Any]:
    """An audit row's ``old_value`` / ``new_value`` that the test expects to be
    a JSON object (the columns may hold any JSON value, or NULL)."""
    assert isinstance(value, dict), value
    return value


def txid(uow: UnitOfWork) -> int:
    return int(uow.session.execute(text("SELECT txid_current()")).scalar_one())


def test_create_update_delete_of_each_entity(data_layer: DataLayer) -> None:
    alice = Actor("user", "alice", "10.1.2.3")
    with data_layer.unit_of_work(actor=alice, correlation_id="req-1") as uow:
        agent = uow.agents.create(name="a1", role="coder", capabilities=["code"])
        task = uow.tasks.create(type="t", payload={"x": 1}, priority=3)
        sess = uow.sessions.create(session_key="k1", user_id="u", data={"a": 1})
        ach = uow.achievements.create(agent_id=agent.id, achievement_type="first_task", points=10)
        tx = txid(uow)
        uow.commit()
    for resource, entity in (
        (agent, "agent"),
        (task, "task"),
        (sess, "session"),
        (ach, "achievement"),
    ):
        [row] = audit_rows(data_layer, resource.id)
        assert (row.action, row.resource_type, row.resource_id) == (
            "create",
            entity,
            str(resource.id),
        )
        assert (row.actor_type, row.actor_id, row.ip_address) == ("user", "alice", "10.1.2.3")
        assert row.old_value is None
        assert obj(row.new_value)["id"] == str(resource.id)
        assert row.metadata_ == {"txid": tx, "correlation_id": "req-1"}
    [row] = audit_rows(data_layer, agent.id)
    assert obj(row.new_value)["capabilities"] == ["code"]
    assert obj(row.new_value)["metadata"] == {}
    assert datetime.fromisoformat(obj(row.new_value)["created_at"]) == agent.created_at

    with data_layer.unit_of_work(actor=Actor("agent", str(agent.id))) as uow:
        started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
        uow.tasks.update(task.id, status="in_progress", started_at=started, priority=3)
        uow.commit()
    _, upd = audit_rows(data_layer, task.id)
    assert upd.action == "update"
    assert (upd.actor_type, upd.actor_id, upd.ip_address) == ("agent", str(agent.id), None)
    # Only the changed fields (priority was set to its own value; updated_at is bookkeeping).
    assert upd.old_value == {"status": "pending", "started_at": None}
    assert upd.new_value == {"status": "in_progress", "started_at": started.isoformat()}
    assert "correlation_id" not in upd.metadata_

    with data_layer.unit_of_work() as uow:
        uow.sessions.delete(sess.id)
        uow.commit()
    _, gone = audit_rows(data_layer, sess.id)
    assert (gone.action, gone.actor_type, gone.actor_id) == ("delete", "system", None)
    assert gone.new_value is None
    assert obj(gone.old_value)["session_key"] == "k1"
    assert obj(gone.old_value)["data"] == {"a": 1}
    assert obj(gone.old_value)["ip_address"] is None


def test_update_that_changes_nothing_writes_no_row(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        agent = uow.agents.create(name="same", role="r", status="idle")
        uow.commit()
    with data_layer.unit_of_work() as uow:
        uow.agents.update(agent.id, status="idle", role="r", capabilities=[])
        a = uow.agents.get_or_raise(agent.id)
        a.metadata_ = {}
        uow.session.flush()
        uow.commit()
    assert [r.action for r in audit_rows(data_layer, agent.id)] == ["create"]


def test_in_place_jsonb_mutation_is_audited_with_old_values(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        agent = uow.agents.create(name="m", role="r", capabilities=["a"], metadata={"k": 1})
        uow.commit()
    with data_layer.unit_of_work() as uow:
        a = uow.agents.get_or_raise(agent.id)
        a.capabilities.append("b")
        a.metadata_["k"] = 2
        a.metadata_["new"] = True
        uow.commit()
    _, upd = audit_rows(data_layer, agent.id)
    assert upd.action == "update"
    assert upd.old_value == {"capabilities": ["a"], "metadata": {"k": 1}}
    assert upd.new_value == {"capabilities": ["a", "b"], "metadata": {"k": 2, "new": True}}


def test_bulk_update_delete_and_insert_write_one_row_per_affected_row(
    data_layer: DataLayer,
) -> None:
    bob = Actor("service", "janitor")
    with data_layer.unit_of_work(actor=bob) as uow:
        ids = [uow.agents.create(name=f"b{i}", role="r", status="idle").id for i in range(4)]
        uow.commit()
    with data_layer.unit_of_work(actor=bob) as uow:
        result = uow.session.execute(
            update(Agent).where(Agent.name.in_(["b0", "b1", "b2"])).values(status="offline")
        )
        assert isinstance(result, CursorResult)  # what a bulk UPDATE returns: rowcount
        assert result.rowcount == 3
        uow.commit()
    for i, ident in enumerate(ids):
        rows = audit_rows(data_layer, ident, action="update")
        if i == 3:
            assert rows == []
            continue
        [row] = rows
        assert (row.old_value, row.new_value) == ({"status": "idle"}, {"status": "offline"})
        assert (row.actor_type, row.actor_id) == ("service", "janitor")
        assert row.metadata_["bulk"] is True

    # Bulk UPDATE by primary key (a list of parameter sets).
    with data_layer.unit_of_work() as uow:
        uow.session.execute(
            update(Agent), [{"id": ids[0], "role": "x"}, {"id": ids[3], "role": "y"}]
        )
        uow.commit()
    assert [r.new_value for r in audit_rows(data_layer, ids[3], action="update")] == [{"role": "y"}]

    with data_layer.unit_of_work() as uow:
        uow.session.execute(delete(Agent).where(Agent.status == "offline"))
        uow.commit()
    deleted = audit_rows(data_layer, action="delete")
    assert sorted(r.resource_id or "" for r in deleted) == sorted(str(i) for i in ids[:3])
    by_id = {r.resource_id: r for r in deleted}
    assert obj(by_id[str(ids[0])].old_value)["role"] == "x"
    assert obj(by_id[str(ids[0])].old_value)["status"] == "offline"

    with data_layer.unit_of_work() as uow:
        uow.session.execute(
            insert(Task), [{"type": "bulk", "payload": {"n": n}, "priority": 2} for n in range(5)]
        )
        uow.commit()
    created = audit_rows(data_layer, action="create", resource_type="task")
    assert sorted(obj(r.new_value)["payload"]["n"] for r in created) == list(range(5))
    assert all(obj(r.new_value)["status"] == "pending" and r.old_value is None for r in created)


def test_rollback_and_savepoint_rollback_discard_their_rows(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        uow.agents.create(name="gone", role="r")
    with data_layer.unit_of_work() as uow:
        kept = uow.agents.create(name="kept", role="r")
        savepoint = uow.session.begin_nested()
        inner = uow.agents.create(name="inner", role="r")
        uow.agents.update(kept.id, role="changed-inside")
        savepoint.rollback()
        with uow.session.begin_nested():
            uow.agents.update(kept.id, status="busy")
        uow.commit()
    rows = audit_rows(data_layer)
    assert [(r.resource_id, r.action) for r in rows] == [
        (str(kept.id), "create"),
        (str(kept.id), "update"),
    ]
    assert rows[1].new_value == {"status": "busy"}
    assert str(inner.id) not in {r.resource_id for r in rows}


def test_retried_transactions_leave_only_the_committed_attempts_rows(
    make_data_layer: Callable[..., DataLayer], data_layer: DataLayer
) -> None:
    dl = make_data_layer(pool_max=8, max_retries=200, retry_backoff_max=0.02)
    with dl.unit_of_work() as uow:
        agent_id = uow.agents.create(name="counter", role="r", metadata={"n": 0}).id
        uow.commit()

    def worker(i: int) -> None:
        for _ in range(10):
            dl.run_in_transaction(increment(agent_id), actor=Actor("agent", f"w{i}"))

    assert run_threads(4, worker) == []
    assert dl.metrics.retries > 0  # attempts did fail and run again
    updates = audit_rows(dl, agent_id, action="update")
    # One row per committed increment, forming the exact chain 0 -> 1 -> ... -> 40.
    assert len(updates) == 40
    assert [
        (obj(r.old_value)["metadata"]["n"], obj(r.new_value)["metadata"]["n"]) for r in updates
    ] == [(n, n + 1) for n in range(40)]
    assert len({r.metadata_["txid"] for r in updates}) == 40


def test_actor_never_leaks_between_threads_or_pooled_connections(
    make_data_layer: Callable[..., DataLayer], data_layer: DataLayer
) -> None:
    dl = make_data_layer(pool_min=1, pool_max=1)  # every unit of work reuses one connection
    names: dict[str, uuid.UUID] = {}

    def create(name: str, **kw: object) -> None:
        with dl.unit_of_work(**kw) as uow:  # type: ignore[arg-type]
            names[name] = uow.agents.create(name=name, role="r").id
            uow.commit()

    create("explicit", actor=Actor("user", "carol", "192.168.0.9"))
    create("after-explicit")
    with acting_as(Actor("agent", "ctx")), correlated("corr-7"):
        create("contextvar")
        other = threading.Thread(target=create, args=("other-thread",))
        other.start()
        other.join()
    create("after-contextvar")

    def who(name: str) -> tuple[str, str | None, str | None, str | None]:
        [row] = audit_rows(dl, names[name])
        return row.actor_type, row.actor_id, row.ip_address, row.metadata_.get("correlation_id")

    assert who("explicit") == ("user", "carol", "192.168.0.9", None)
    assert who("after-explicit") == ("system", None, None, None)
    assert who("contextvar") == ("agent", "ctx", None, "corr-7")
    assert who("other-thread") == ("system", None, None, None)
    assert who("after-contextvar") == ("system", None, None, None)


def test_concurrent_units_of_work_keep_their_own_actor(
    make_data_layer: Callable[..., DataLayer], data_layer: DataLayer
) -> None:
    dl = make_data_layer(pool_max=6)

    def work(i: int) -> None:
        with acting_as(Actor("agent", f"t{i}")):
            for j in range(5):
                with dl.unit_of_work() as uow:
                    uow.agents.create(name=f"t{i}-{j}", role="r")
                    uow.commit()

    assert run_threads(6, work) == []
    rows = audit_rows(dl, action="create")
    assert len(rows) == 30
    assert all(obj(r.new_value)["name"].split("-")[0] == r.actor_id for r in rows)


def test_json_safe_values_in_rows(data_layer: DataLayer) -> None:
    # UUIDs, datetimes and INET values come back from the ORM as Python
    # objects; in the audit row they are strings (Decimal, enums: unit tests).
    with data_layer.unit_of_work() as uow:
        agent = uow.agents.create(name="j", role="r")
        task = uow.tasks.create(type="t", payload={"p": 1}, agent_id=agent.id)
        t = uow.tasks.get_or_raise(task.id)
        t.completed_at = datetime(2026, 5, 6, tzinfo=timezone.utc)
        sess = uow.sessions.create(session_key="j", ip_address="::1")
        uow.commit()
    create, upd = audit_rows(data_layer, task.id)
    assert obj(create.new_value)["agent_id"] == str(agent.id)
    assert upd.new_value == {"completed_at": "2026-05-06T00:00:00+00:00"}
    [row] = audit_rows(data_layer, sess.id)
    assert obj(row.new_value)["ip_address"] == "::1"


def test_audit_logs_reject_update_delete_and_truncate(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        uow.agents.create(name="x", role="r")
        uow.commit()
    for sql in (
        "UPDATE audit_logs SET action = 'delete'",
        "DELETE FROM audit_logs",
        "TRUNCATE audit_logs",
    ):
        # Through a session the guard refuses it before PostgreSQL sees it;
        # straight on a connection, the table's trigger does.
        with (
            pytest.raises(UncapturedWriteError, match="audit trail only"),
            data_layer.unit_of_work() as uow,
        ):
            uow.session.execute(text(sql))
        with (
            pytest.raises(DBAPIError, match="audit_logs is append-only"),
            data_layer.engine.begin() as conn,
        ):
            conn.execute(text(sql))
    assert len(audit_rows(data_layer)) == 1


def test_repository_queries_and_keyset_pagination(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work(actor=Actor("user", "dave")) as uow:
        agent = uow.agents.create(name="p", role="r")
        uow.commit()
    for i in range(7):
        with data_layer.unit_of_work(actor=Actor("user", "erin"), correlation_id="batch") as uow:
            uow.agents.update(agent.id, metadata={"i": i})
            uow.commit()
    with data_layer.unit_of_work(read_only=True) as uow:
        pages, after = [], None
        while True:
            page = uow.audit.history("agent", agent.id, limit=3, after=after)
            pages.append([r.action for r in page])
            if page.next_cursor is None:
                break
            after = page.next_cursor
        assert pages == [["create", "update", "update"], ["update"] * 3, ["update"] * 2]
        history = uow.audit.history(None, str(agent.id), limit=100).items
        assert [obj(r.new_value).get("metadata") for r in history[1:]] == [
            {"i": i} for i in range(7)
        ]
        assert uow.audit.by_actor("user", "dave").items[0].action == "create"
        assert len(uow.audit.by_actor("user").items) == 8
        assert len(uow.audit.by_action("update").items) == 7
        assert uow.audit.count(correlation_id="batch") == 7
        middle = history[3].timestamp
        assert len(uow.audit.between(since=middle).items) == 5
        assert len(uow.audit.between(until=middle).items) == 3
        assert len(uow.audit.between(since=middle, until=history[5].timestamp).items) == 2
        assert uow.audit.count(txid=history[0].metadata_["txid"]) == 1
        latest = uow.audit.history("agent", agent.id, descending=True, limit=1).items[0]
        assert latest.new_value == {"metadata": {"i": 6}}


def test_bulk_updates_of_json_columns_record_only_what_changed(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        a = uow.agents.create(name="j1", role="r", metadata={"k": 1}, capabilities=["x"])
        b = uow.agents.create(name="j2", role="r", metadata={"k": 2})
        uow.commit()
    with data_layer.unit_of_work() as uow:
        uow.session.execute(
            update(Agent).where(Agent.id == a.id).values({Agent.metadata_: {"k": 10}})
        )
        uow.session.execute(update(Agent).ordered_values((Agent.capabilities, ["y"])))
        uow.session.execute(update(Agent), [{"id": b.id, "metadata_": {"k": 2}, "role": "q"}])
        uow.commit()
    history_a = [(r.old_value, r.new_value) for r in audit_rows(data_layer, a.id, action="update")]
    assert history_a == [
        ({"metadata": {"k": 1}}, {"metadata": {"k": 10}}),
        ({"capabilities": ["x"]}, {"capabilities": ["y"]}),
    ]
    history_b = [(r.old_value, r.new_value) for r in audit_rows(data_layer, b.id, action="update")]
    # metadata was set to its own value: only role changed.
    assert history_b == [
        ({"capabilities": []}, {"capabilities": ["y"]}),
        ({"role": "r"}, {"role": "q"}),
    ]


@pytest.mark.parametrize("isolation", ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"])
def test_concurrent_bulk_increments_chain_exactly_in_the_audit_trail(
    isolation: str, make_data_layer: Callable[..., DataLayer], data_layer: DataLayer
) -> None:
    # Old values of a bulk UPDATE are what it overwrote: locked at READ
    # COMMITTED, guaranteed by the snapshot (or a retry) above it.
    dl = make_data_layer(pool_max=8, max_retries=200, retry_backoff_max=0.02)
    with dl.unit_of_work() as uow:
        task_id = uow.tasks.create(type="counter", payload={}).id
        uow.commit()

    def bump(uow: UnitOfWork) -> None:
        uow.session.execute(
            update(Task).where(Task.id == task_id).values(retry_count=Task.retry_count + 1)
        )

    def worker(_: int) -> None:
        for _ in range(10):
            dl.run_in_transaction(bump, isolation=isolation)

    assert run_threads(4, worker) == []
    rows = audit_rows(dl, task_id, action="update")
    pairs = sorted((obj(r.old_value)["retry_count"], obj(r.new_value)["retry_count"]) for r in rows)
    assert pairs == [(n, n + 1) for n in range(40)]


@pytest.mark.parametrize("how", ["repository", "bulk"])
def test_foreign_key_cascades_are_audited(how: str, data_layer: DataLayer) -> None:
    # Deleting an agent makes the database delete its achievements (ON DELETE
    # CASCADE) and unassign its tasks (SET NULL): those changes are audited too.
    with data_layer.unit_of_work() as uow:
        agent = uow.agents.create(name="doomed", role="r")
        other = uow.agents.create(name="spared", role="r")
        ach = uow.achievements.create(agent_id=agent.id, achievement_type="first_task", points=10)
        kept = uow.achievements.create(agent_id=other.id, achievement_type="first_task", points=10)
        task = uow.tasks.create(type="t", payload={}, agent_id=agent.id)
        uow.commit()
    with data_layer.unit_of_work(actor=Actor("user", "gc")) as uow:
        if how == "repository":
            uow.agents.delete(agent.id)
        else:
            uow.session.execute(delete(Agent).where(Agent.name == "doomed"))
        uow.commit()
    [gone] = audit_rows(data_layer, ach.id, action="delete")
    assert (gone.actor_type, gone.actor_id) == ("user", "gc")
    assert obj(gone.old_value)["points"] == 10
    assert obj(gone.old_value)["agent_id"] == str(agent.id)
    assert gone.metadata_["cascade"] is True
    [unassigned] = audit_rows(data_layer, task.id, action="update")
    assert (unassigned.old_value, unassigned.new_value) == (
        {"agent_id": str(agent.id)},
        {"agent_id": None},
    )
    assert audit_rows(data_layer, kept.id, action="delete") == []
    assert len(audit_rows(data_layer, agent.id, action="delete")) == 1


def test_legacy_bulk_methods_are_audited(data_layer: DataLayer) -> None:
    # Session.bulk_* write without flush events: the package's session routes
    # them through ORM statements, which are captured.
    ident = uuid.uuid4()
    with data_layer.unit_of_work() as uow:
        uow.session.bulk_insert_mappings(Agent, [{"id": ident, "name": "l1", "role": "r"}])
        uow.session.bulk_update_mappings(Agent, [{"id": ident, "role": "q"}])
        uow.session.bulk_save_objects([Agent(name="l2", role="r")])
        uow.commit()
    with data_layer.unit_of_work() as uow:
        l2 = uow.agents.get_by_name("l2")
        assert l2 is not None
        uow.session.expunge(l2)
    l2.status = "busy"
    with data_layer.unit_of_work() as uow:
        uow.session.bulk_save_objects([l2])
        uow.commit()
    first = audit_rows(data_layer, ident)
    assert [(r.action, obj(r.new_value).get("role")) for r in first] == [
        ("create", "r"),
        ("update", "q"),
    ]
    second = audit_rows(data_layer, l2.id)
    assert [r.action for r in second] == ["create", "update"]
    assert (second[1].old_value, second[1].new_value) == ({"status": "idle"}, {"status": "busy"})


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE agents SET status = 'busy'",
        "update public.agents set status = 'busy'",
        'DELETE FROM "tasks"',
        "INSERT INTO achievements (agent_id, achievement_type) SELECT id, 'x' FROM agents",
        "WITH gone AS (DELETE FROM sessions RETURNING id) SELECT count(*) FROM gone",
        "TRUNCATE agents CASCADE",
        "truncate table only tasks",
    ],
)
def test_plain_sql_writes_to_tracked_tables_are_refused(sql: str, data_layer: DataLayer) -> None:
    from orchestrator_data import UncapturedWriteError

    with data_layer.unit_of_work() as uow:
        uow.agents.create(name="x", role="r")
        with pytest.raises(UncapturedWriteError, match="escape the audit trail"):
            uow.session.execute(text(sql))


def test_plain_sql_reads_and_other_tables_are_allowed(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        uow.session.execute(text("SELECT count(*) FROM agents WHERE status = 'update'"))
        uow.session.execute(text("CREATE TEMP TABLE agents_history (x int) ON COMMIT DROP"))
        uow.session.execute(text("UPDATE agents_history SET x = 1"))


def test_audit_can_be_switched_off(make_data_layer: Callable[..., DataLayer]) -> None:
    dl = make_data_layer(audit_enabled=False, pool_min=1)
    with dl.unit_of_work() as uow:
        agent = uow.agents.create(name="unaudited", role="r")
        uow.commit()
    with dl.unit_of_work() as uow:
        assert uow.audit.count(resource_id=str(agent.id)) == 0
