"""Units of work and run_in_transaction against real PostgreSQL, with real
threads contending for the same row."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from fixtures.concurrency import increment, make_counter, run_threads
from orchestrator_data import (
    DatabaseTimeoutError,
    DataLayer,
    RetryExhaustedError,
    UnitOfWork,
    ValidationError,
)
from orchestrator_data.errors import sqlstate_of


def test_leaving_without_commit_rolls_back(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        uow.agents.create(name="ghost", role="r")
    with pytest.raises(RuntimeError), data_layer.unit_of_work() as uow:
        uow.agents.create(name="ghost2", role="r")
        raise RuntimeError("boom")
    with data_layer.unit_of_work() as uow:
        assert uow.agents.count() == 0


def test_isolation_and_read_only_are_set_before_the_first_statement(data_layer: DataLayer) -> None:
    def show(uow: UnitOfWork, what: str) -> str:
        return str(uow.session.execute(text(f"SHOW {what}")).scalar())

    with data_layer.unit_of_work() as uow:
        assert show(uow, "transaction_isolation") == "serializable"
        assert show(uow, "transaction_read_only") == "off"
    with data_layer.unit_of_work(read_only=True) as uow:
        assert show(uow, "transaction_isolation") == "serializable"
        assert show(uow, "transaction_read_only") == "on"
        assert show(uow, "transaction_deferrable") == "on"
        with pytest.raises(DBAPIError) as info:
            uow.agents.create(name="nope", role="r")
        assert sqlstate_of(info.value) == "25006"  # read_only_sql_transaction
    with data_layer.unit_of_work(isolation="read committed") as uow:
        assert show(uow, "transaction_isolation") == "read committed"
    # The level does not leak into the next unit of work on the same pooled connection.
    with data_layer.unit_of_work() as uow:
        assert show(uow, "transaction_isolation") == "serializable"
        assert show(uow, "transaction_read_only") == "off"


def test_unknown_isolation_level_is_refused(data_layer: DataLayer) -> None:
    from orchestrator_data import ConfigurationError

    with pytest.raises(ConfigurationError), data_layer.unit_of_work(isolation="SNAPSHOT"):
        pass


def test_concurrent_increments_are_exact_with_retries(
    make_data_layer: Callable[..., DataLayer],
) -> None:
    dl = make_data_layer(pool_max=10, max_retries=200, retry_backoff_max=0.05)
    agent_id = make_counter(dl)

    def worker(_: int) -> None:
        for _ in range(50):
            dl.run_in_transaction(increment(agent_id))

    assert run_threads(8, worker) == []
    with dl.unit_of_work() as uow:
        assert uow.agents.get_or_raise(agent_id).metadata_["n"] == 400
    assert dl.metrics.retries > 0


def test_retries_are_bounded_and_keep_the_last_error(
    make_data_layer: Callable[..., DataLayer],
) -> None:
    dl = make_data_layer(retry_backoff_base=0.001, retry_backoff_max=0.002)
    agent_id = make_counter(dl)
    calls = [0]

    def always_conflicts(uow: UnitOfWork) -> None:
        calls[0] += 1
        uow.agents.get_or_raise(agent_id)
        # Another transaction commits a write to the row we read: our write
        # then fails with SQLSTATE 40001 every time.
        dl.run_in_transaction(increment(agent_id))
        uow.agents.update(agent_id, metadata={"n": -1})

    with pytest.raises(RetryExhaustedError) as info:
        dl.run_in_transaction(always_conflicts, retries=3)
    assert calls[0] == 4
    assert info.value.attempts == 4
    assert sqlstate_of(info.value.last_error) == "40001"
    with dl.unit_of_work() as uow:
        assert uow.agents.get_or_raise(agent_id).metadata_["n"] == 4  # only the inner commits


def test_other_errors_are_not_retried(data_layer: DataLayer) -> None:
    calls = [0]

    def bad(uow: UnitOfWork) -> None:
        calls[0] += 1
        uow.tasks.create(type="t", payload={}, priority=0)

    with pytest.raises(ValidationError):
        data_layer.run_in_transaction(bad)
    assert calls[0] == 1


def test_statement_timeout_is_a_clear_error(make_data_layer: Callable[..., DataLayer]) -> None:
    dl = make_data_layer(statement_timeout=0.2, pool_min=1)
    started = time.monotonic()
    with pytest.raises(DatabaseTimeoutError, match="statement_timeout"), dl.unit_of_work() as uow:
        uow.session.execute(text("SELECT pg_sleep(3)"))
    assert time.monotonic() - started < 2.5
    with dl.unit_of_work() as uow:  # the pool recovered
        assert uow.session.execute(text("SELECT 1")).scalar() == 1


def test_full_pool_waits_then_fails_clearly(make_data_layer: Callable[..., DataLayer]) -> None:
    dl = make_data_layer(pool_min=1, pool_max=2, pool_timeout=0.5)
    with dl.unit_of_work(), dl.unit_of_work():
        started = time.monotonic()
        with pytest.raises(DatabaseTimeoutError, match=r"pool_timeout|pool_max"), dl.unit_of_work():
            pass
        waited = time.monotonic() - started
        assert 0.4 <= waited < 2.0
    # Released connections serve the next unit of work at once.
    with dl.unit_of_work() as uow:
        assert uow.session.execute(text("SELECT 1")).scalar() == 1


def test_waiting_unit_of_work_gets_a_connection_when_one_frees(
    make_data_layer: Callable[..., DataLayer],
) -> None:
    dl = make_data_layer(pool_min=1, pool_max=1, pool_timeout=3)
    got: list[float] = []

    def late() -> None:
        started = time.monotonic()
        with dl.unit_of_work() as uow:
            uow.session.execute(text("SELECT 1"))
            got.append(time.monotonic() - started)

    with dl.unit_of_work():
        t = threading.Thread(target=late)
        t.start()
        time.sleep(0.3)
        assert got == []
    t.join()
    assert len(got) == 1 and got[0] >= 0.25
