"""Change capture: every write path through the session yields the right
Change records, inside the transaction and again after commit only."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

import pytest
from sqlalchemy import CursorResult, delete, insert, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session as OrmSession

from orchestrator_data import DataLayer
from orchestrator_data.capture.change_capture import Change, has_written
from orchestrator_data.models import Achievement, Agent, Task


class Recorder:
    def __init__(self, dl: DataLayer) -> None:
        self.flushed: list[Change] = []
        self.committed: list[list[Change]] = []
        self.rollbacks = 0
        dl.changes.on_flush(self._flush)
        dl.changes.on_commit(self._commit)
        dl.changes.on_rollback(self._rollback)

    def _flush(self, session: OrmSession, changes: Sequence[Change]) -> None:
        assert session.in_transaction()
        self.flushed.extend(changes)

    def _commit(self, session: OrmSession, changes: Sequence[Change]) -> None:
        self.committed.append(list(changes))

    def _rollback(self, session: OrmSession) -> None:
        self.rollbacks += 1

    def last_commit(self) -> list[tuple[str, str, uuid.UUID]]:
        return [(c.entity, c.action, c.ident) for c in self.committed[-1]]


@pytest.fixture
def dl_rec(
    make_data_layer: Callable[..., DataLayer], data_layer: DataLayer
) -> tuple[DataLayer, Recorder]:
    dl = make_data_layer(pool_min=1)
    return dl, Recorder(dl)


def test_orm_create_update_delete(dl_rec: tuple[DataLayer, Recorder]) -> None:
    dl, rec = dl_rec
    with dl.unit_of_work() as uow:
        agent = uow.agents.create(name="c1", role="r", capabilities=["a"], metadata={"k": 1})
        uow.commit()
    create = rec.committed[-1][0]
    assert (create.entity, create.action, create.ident, create.old) == (
        "agent",
        "create",
        agent.id,
        None,
    )
    assert create.new is not None
    assert create.new["name"] == "c1"
    assert create.new["metadata"] == {"k": 1}
    assert create.new["created_at"] is not None

    with dl.unit_of_work() as uow:
        uow.agents.update(agent.id, status="busy", role="r")  # role unchanged
        uow.commit()
    upd = rec.committed[-1][0]
    assert (upd.action, upd.old, upd.new) == ("update", {"status": "idle"}, {"status": "busy"})

    with dl.unit_of_work() as uow:
        uow.agents.update(agent.id, status="busy")  # changes nothing
        uow.commit()
    assert len(rec.committed) == 2  # no commit notification: nothing changed

    with dl.unit_of_work() as uow:
        uow.agents.delete(agent.id)
        uow.commit()
    gone = rec.committed[-1][0]
    assert (gone.action, gone.new) == ("delete", None)
    assert gone.old is not None
    assert gone.old["name"] == "c1"
    assert gone.old["status"] == "busy"


def test_in_place_jsonb_mutation_has_old_values(dl_rec: tuple[DataLayer, Recorder]) -> None:
    dl, rec = dl_rec
    with dl.unit_of_work() as uow:
        agent = uow.agents.create(name="m1", role="r", capabilities=["a"], metadata={"k": 1})
        uow.commit()
    with dl.unit_of_work() as uow:
        fresh = uow.agents.get_or_raise(agent.id)
        fresh.capabilities.append("b")
        fresh.metadata_["k"] = 2
        uow.commit()
    change = rec.committed[-1][0]
    assert change.old == {"capabilities": ["a"], "metadata": {"k": 1}}
    assert change.new == {"capabilities": ["a", "b"], "metadata": {"k": 2}}
    fresh.metadata_["k"] = 3  # later mutation does not alter the record
    assert change.new == {"capabilities": ["a", "b"], "metadata": {"k": 2}}


def test_bulk_update_and_delete(dl_rec: tuple[DataLayer, Recorder]) -> None:
    dl, rec = dl_rec
    with dl.unit_of_work() as uow:
        ids = [uow.tasks.create(type="bulk", payload={"i": i}, priority=1 + i).id for i in range(5)]
        uow.commit()
    with dl.unit_of_work() as uow:
        result = uow.session.execute(
            update(Task)
            .where(Task.priority >= 3)
            .values(status="failed", priority=Task.priority + 1)
        )
        assert isinstance(result, CursorResult)  # what a bulk UPDATE returns: rowcount
        assert result.rowcount == 3
        uow.commit()
    changes = rec.committed[-1]
    assert {c.ident for c in changes} == set(ids[2:])
    for c in changes:
        assert c.bulk
        assert c.old is not None
        assert c.new is not None
        assert c.old["status"] == "pending"
        assert c.new["status"] == "failed"
        assert c.new["priority"] == c.old["priority"] + 1
        assert "updated_at" not in c.new

    with dl.unit_of_work() as uow:
        uow.session.execute(
            update(Task), [{"id": ids[0], "priority": 9}, {"id": ids[1], "priority": 2}]
        )
        uow.commit()
    # ids[1] already had priority 2: only ids[0] changed.
    assert [(c.ident, c.old, c.new) for c in rec.committed[-1]] == [
        (ids[0], {"priority": 1}, {"priority": 9})
    ]

    with dl.unit_of_work() as uow:
        uow.session.execute(delete(Task).where(Task.type == "bulk", Task.priority < 3))
        uow.commit()
    deleted = rec.committed[-1]
    assert {c.ident for c in deleted} == {ids[1]}
    assert deleted[0].old is not None
    assert deleted[0].old["payload"] == {"i": 1}


def test_bulk_insert_forms(dl_rec: tuple[DataLayer, Recorder]) -> None:
    dl, rec = dl_rec
    with dl.unit_of_work() as uow:
        uow.session.execute(
            insert(Agent), [{"name": "b1", "role": "r"}, {"name": "b2", "role": "r"}]
        )
        uow.session.execute(insert(Agent).values(name="b3", role="r"))
        uow.commit()
    names = sorted(c.new["name"] for c in rec.committed[-1] if c.new)
    assert names == ["b1", "b2", "b3"]
    assert all(c.action == "create" and c.bulk for c in rec.committed[-1])
    with dl.unit_of_work() as uow:
        a = uow.agents.get_by_name("b1")
        assert a is not None
        stmt = pg_insert(Achievement).on_conflict_do_nothing()
        uow.session.execute(stmt, [{"agent_id": a.id, "achievement_type": "x", "points": 1}])
        uow.commit()
    assert [c.entity for c in rec.committed[-1]] == ["achievement"]


def test_rollback_and_savepoint_rollback_drop_changes(dl_rec: tuple[DataLayer, Recorder]) -> None:
    dl, rec = dl_rec
    with dl.unit_of_work() as uow:
        uow.agents.create(name="gone", role="r")
    assert rec.committed == []
    assert rec.rollbacks >= 1
    with dl.unit_of_work() as uow:
        kept = uow.agents.create(name="kept", role="r")
        nested = uow.session.begin_nested()
        uow.agents.create(name="dropped", role="r")
        nested.rollback()
        with uow.session.begin_nested():
            inner = uow.agents.create(name="released", role="r")
        uow.commit()
    assert sorted(rec.last_commit()) == sorted(
        [("agent", "create", kept.id), ("agent", "create", inner.id)]
    )


def test_changes_are_reported_once_per_commit(dl_rec: tuple[DataLayer, Recorder]) -> None:
    dl, rec = dl_rec
    with dl.unit_of_work() as uow:
        first = uow.agents.create(name="one", role="r")
        uow.commit()
        second = uow.agents.create(name="two", role="r")
        uow.commit()
    assert [c[0].ident for c in rec.committed] == [first.id, second.id]


def test_has_written(dl_rec: tuple[DataLayer, Recorder]) -> None:
    dl, _ = dl_rec
    with dl.unit_of_work() as uow:
        uow.agents.count()
        assert not has_written(uow.session)
        uow.agents.create(name="w", role="r")
        assert has_written(uow.session)
        uow.commit()
        assert not has_written(uow.session)
        uow.session.execute(text("SELECT 1"))
        assert not has_written(uow.session)
