"""Engine behaviour a user relies on: slow-query log, application_name,
warm pool, idle recycling, secrets kept out of logs and errors."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from orchestrator_data import DatabaseUnavailableError, DataLayer, Settings
from orchestrator_data.errors import OrchestratorDataError


def test_slow_queries_are_logged_without_parameter_values(
    make_data_layer: Callable[..., DataLayer], caplog: pytest.LogCaptureFixture
) -> None:
    dl = make_data_layer(slow_query_threshold=0.05, pool_min=1)
    caplog.set_level(logging.WARNING, logger="orchestrator_data.slow_query")
    with dl.unit_of_work() as uow:
        uow.session.execute(text("SELECT pg_sleep(0.1), :secret"), {"secret": "hunter2-token"})
        uow.session.execute(text("SELECT 1"))
    slow = [r.getMessage() for r in caplog.records if r.name == "orchestrator_data.slow_query"]
    assert len(slow) == 1
    assert "pg_sleep" in slow[0]
    assert "hunter2-token" not in slow[0]
    assert dl.metrics.slow_queries._value.get() == 1


def test_application_name_and_statement_timeout_reach_the_server(
    make_data_layer: Callable[..., DataLayer],
) -> None:
    dl = make_data_layer(application_name="od-test-app", statement_timeout=12.0, pool_min=1)
    with dl.unit_of_work() as uow:
        assert uow.session.execute(text("SHOW application_name")).scalar() == "od-test-app"
        assert uow.session.execute(text("SHOW statement_timeout")).scalar() == "12s"


def test_pool_is_warmed_to_its_minimum(make_data_layer: Callable[..., DataLayer]) -> None:
    dl = make_data_layer(pool_min=3, application_name="od-warm-test")
    assert dl.engine.pool.checkedin() == 3  # type: ignore[attr-defined]


def test_idle_connections_are_replaced(make_data_layer: Callable[..., DataLayer]) -> None:
    dl = make_data_layer(pool_min=1, pool_max=1, pool_idle_timeout=0.2)
    with dl.unit_of_work() as uow:
        first = uow.session.execute(text("SELECT pg_backend_pid()")).scalar()
    with dl.unit_of_work() as uow:
        assert uow.session.execute(text("SELECT pg_backend_pid()")).scalar() == first
    import time

    time.sleep(0.3)
    with dl.unit_of_work() as uow:
        assert uow.session.execute(text("SELECT pg_backend_pid()")).scalar() != first


def test_passwords_stay_out_of_reprs_and_errors(od_settings: Settings) -> None:
    url = (
        make_url(od_settings.database_url or "")
        .set(password="Sup3r-Secret-Pw", host="127.0.0.1", port=1, query={})
        .render_as_string(hide_password=False)
    )
    settings = od_settings.with_overrides(database_url=url, warm_pool=False, connect_timeout=2)
    dl = DataLayer(settings)
    try:
        assert "Sup3r-Secret-Pw" not in repr(dl)
        assert "Sup3r-Secret-Pw" not in repr(dl.engine)
        with pytest.raises(DatabaseUnavailableError) as info, dl.unit_of_work():
            pass
        assert "Sup3r-Secret-Pw" not in str(info.value)
        assert "Sup3r-Secret-Pw" not in repr(info.value)
    finally:
        dl.close()


def test_missing_database_url_is_a_clear_error() -> None:
    with pytest.raises(OrchestratorDataError, match="DATABASE_URL"):
        DataLayer(Settings())


def test_tls_options_reach_libpq(
    make_data_layer: Callable[..., DataLayer], od_settings: Settings
) -> None:
    url = make_url(od_settings.database_url or "")
    if not url.host or url.host.startswith("/") or "host" in url.query:
        pytest.skip("libpq never uses TLS on a unix socket (the embedded server's only listener)")
    # The test server has no TLS: requiring it must fail, which shows the
    # option is passed through rather than dropped.
    dl = make_data_layer(sslmode="require", warm_pool=False)
    with pytest.raises(DatabaseUnavailableError, match="SSL"), dl.unit_of_work():
        pass
    with pytest.raises(DatabaseUnavailableError, match="SSL"):
        make_data_layer(sslmode="require")
