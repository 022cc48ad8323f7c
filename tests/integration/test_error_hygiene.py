"""No parameter value ever reaches an error or a log line.

psycopg2 fills the parameters into the SQL on the client, so PostgreSQL's
report quotes them (``LINE 1: ...``, ``DETAIL: Key (name)=(...)``, ``invalid
input syntax for type uuid: "..."``). Each test puts a sentinel into one kind
of failing parameter and looks for it everywhere a user could see it: the
formatted traceback, ``str`` and ``repr`` of every exception reachable through
``__cause__``, ``__context__``, ``.orig`` and ``.last_error``, psycopg2's
``pgerror``, and every log record of the package (at DEBUG) and of
SQLAlchemy's engine (at INFO, the CLI's ``-v``). What helps stays: the
SQLSTATE and the names of the constraint, table and column.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg2
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from orchestrator_data import Actor, DataLayer
from orchestrator_data.errors import (
    ConflictError,
    OrchestratorDataError,
    ValidationError,
    sqlstate_of,
)
from orchestrator_data.models import Task
from orchestrator_data.uow import UnitOfWork


def reachable(err: BaseException) -> Iterator[BaseException]:
    """``err`` and every exception it leads to."""
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for attr in ("__cause__", "__context__", "orig", "last_error"):
            linked = getattr(current, attr, None)
            if isinstance(linked, BaseException):
                todo.append(linked)


def assert_clean(err: BaseException, secret: str) -> None:
    shown = "".join(traceback.format_exception(err))
    assert secret not in shown
    for each in reachable(err):
        assert secret not in str(each), type(each)
        assert secret not in repr(each), type(each)
        if isinstance(each, psycopg2.Error):
            assert secret not in (each.pgerror or "")
        if isinstance(each, sa_exc.StatementError):
            assert each.params is None  # kept for pickling otherwise


def assert_logs_clean(caplog: pytest.LogCaptureFixture, secret: str) -> None:
    formatter = logging.Formatter()
    for record in caplog.records:
        assert secret not in record.getMessage(), record.name
        if record.exc_info:
            assert secret not in formatter.formatException(record.exc_info), record.name


@pytest.fixture
def dl(make_data_layer: Callable[..., DataLayer], caplog: pytest.LogCaptureFixture) -> DataLayer:
    # Every statement counts as slow, so the slow-query log sees them all.
    caplog.set_level(logging.DEBUG, logger="orchestrator_data")
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")
    return make_data_layer(slow_query_threshold=1e-6, pool_min=1)


def failure(
    dl: DataLayer, act: Callable[[UnitOfWork], object], actor: Actor | None = None
) -> Exception:
    with pytest.raises(Exception) as info, dl.unit_of_work(actor=actor) as uow:
        act(uow)
        uow.commit()
    return info.value


def sentinel() -> str:
    return f"S3NT1NEL-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Kept:
    """What a scrubbed error still says."""

    sqlstate: str
    words: tuple[str, ...] = ()


def assert_kept(err: BaseException, kept: Kept) -> None:
    assert sqlstate_of(err) == kept.sqlstate
    shown = "".join(traceback.format_exception(err))
    assert f"SQLSTATE {kept.sqlstate}" in shown
    for word in kept.words:
        assert word in shown


def test_unique_violation(dl: DataLayer, caplog: pytest.LogCaptureFixture) -> None:
    secret = sentinel()
    with dl.unit_of_work() as uow:
        uow.agents.create(name=secret, role="r")
        uow.commit()
    err = failure(dl, lambda uow: uow.agents.create(name=secret, role="r"))
    assert isinstance(err, ConflictError)
    assert (err.constraint, err.sqlstate, err.table) == ("uq_agents_name", "23505", "agents")
    assert str(err) == "agent with this name already exists"
    assert_kept(err, Kept("23505", ("uq_agents_name", "table agents", "details withheld")))
    assert_clean(err, secret)
    assert_logs_clean(caplog, secret)


def test_foreign_key_violation(dl: DataLayer, caplog: pytest.LogCaptureFixture) -> None:
    missing = uuid.uuid4()
    err = failure(dl, lambda uow: uow.tasks.create(type="t", payload={}, agent_id=missing))
    assert isinstance(err, ConflictError)
    assert err.constraint == "fk_tasks_agent_id_agents"
    assert_kept(err, Kept("23503", ("fk_tasks_agent_id_agents", "table tasks")))
    for form in (str(missing), missing.hex):
        assert_clean(err, form)
        assert_logs_clean(caplog, form)


def test_check_violation(dl: DataLayer, caplog: pytest.LogCaptureFixture) -> None:
    secret = sentinel()

    def act(uow: UnitOfWork) -> None:
        # Past the schema's own check of the status, as a plain ORM write.
        uow.session.add(Task(type="t", payload={}, status=secret))
        uow.session.flush()

    err = failure(dl, act)
    assert isinstance(err, ValidationError)
    assert err.fields == ["status"]
    assert_kept(err, Kept("23514", ("ck_tasks_status", "table tasks")))
    assert_clean(err, secret)
    assert_logs_clean(caplog, secret)


@pytest.mark.parametrize(
    ("sql", "value", "sqlstate"),
    [
        ("SELECT CAST(:v AS uuid)", "{s}", "22P02"),  # invalid input syntax, value quoted
        ("SELECT CAST(:v AS jsonb)", '{{"a": {s}', "22P02"),  # value in DETAIL and CONTEXT
        ("SELECT CAST(:v AS integer)", "98765432101234{n}", "22003"),  # out of range, quoted
        ("SELECT CAST(:v AS regclass)", "{s}", "42P01"),  # not translated: still scrubbed
    ],
)
def test_bad_input_values(
    dl: DataLayer, caplog: pytest.LogCaptureFixture, sql: str, value: str, sqlstate: str
) -> None:
    secret = sentinel()
    number = str(uuid.uuid4().int)[:6]
    param = value.format(s=secret, n=number)
    err = failure(dl, lambda uow: uow.session.execute(text(sql), {"v": param}))
    if sqlstate.startswith("22"):
        assert isinstance(err, ValidationError)
        assert err.sqlstate == sqlstate
    else:
        assert isinstance(err, sa_exc.ProgrammingError)
        assert not isinstance(err, OrchestratorDataError)
        assert '"…"' in str(err)  # the quoted value masked, the rest of the message kept
    assert_kept(err, Kept(sqlstate))
    for hidden in (param, secret, "98765432101234" + number):
        assert_clean(err, hidden)
        assert_logs_clean(caplog, hidden)


def test_out_of_range_column_value(dl: DataLayer, caplog: pytest.LogCaptureFixture) -> None:
    big = 2**40 + int(str(uuid.uuid4().int)[:6])

    def act(uow: UnitOfWork) -> None:
        uow.session.add(Task(type="t", payload={}, priority=big))
        uow.session.flush()

    err = failure(dl, act)
    assert isinstance(err, ValidationError)
    assert_kept(err, Kept("22003"))
    assert_clean(err, str(big))
    assert_logs_clean(caplog, str(big))


def test_bad_actor_fields_are_refused_without_their_value(
    dl: DataLayer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = sentinel()
    for kwargs in ({"ip": secret}, {"id": "x" * 300 + secret}, {"type": secret * 10}):
        with pytest.raises(ValidationError) as info:
            Actor(**{"type": "user", "id": "u", **kwargs})
        assert_clean(info.value, secret)
    assert_logs_clean(caplog, secret)


@pytest.mark.parametrize(
    ("field", "value", "sqlstate"),
    [("ip", "{s}", "22P02"), ("id", "{s}" + "x" * 300, "22001"), ("type", "{s}" * 5, "22001")],
)
def test_actor_values_the_server_refuses_stay_out_of_errors(
    dl: DataLayer, caplog: pytest.LogCaptureFixture, field: str, value: str, sqlstate: str
) -> None:
    # An Actor that got past its own checks (say the column shrank): the
    # server refuses the audit row, and the error still says nothing of it.
    secret = sentinel()
    actor = Actor("user", "u")
    object.__setattr__(actor, field, value.format(s=secret))
    err = failure(dl, lambda uow: uow.agents.create(name=sentinel(), role="r"), actor=actor)
    assert isinstance(err, ValidationError)
    assert err.sqlstate == sqlstate
    assert_clean(err, secret)
    assert_logs_clean(caplog, secret)


def test_run_in_transaction_and_a_reused_session_are_clean_too(
    dl: DataLayer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = sentinel()
    with pytest.raises(ValidationError) as info:
        dl.run_in_transaction(
            lambda uow: uow.session.execute(text("SELECT CAST(:v AS uuid)"), {"v": secret})
        )
    assert_clean(info.value, secret)
    # After a failed flush the session refuses work, quoting the first error.
    with dl.unit_of_work() as uow:
        uow.session.add(Task(type="t", payload={}, status=secret))
        with pytest.raises(ValidationError) as first:
            uow.session.flush()
        with pytest.raises(sa_exc.PendingRollbackError) as again:
            uow.session.execute(text("SELECT 1"))
    assert "ck_tasks_status" in str(again.value)
    for err in (first.value, again.value):
        assert_clean(err, secret)
    assert_logs_clean(caplog, secret)
