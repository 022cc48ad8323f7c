"""Nothing writes past the audit trail: every write to a tracked table through
a session is captured or refused, whatever form it takes; audit rows are
written by the trail alone; rows leave audit_logs only through retention,
which an ordinary session or application role cannot trigger."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest
from sqlalchemy import Table, delete, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session as OrmSession

from orchestrator_data import Actor, DataLayer, Settings, UncapturedWriteError
from orchestrator_data.models import Agent, AuditLog

# Core tables of the models (declarative types them as plain FromClause).
AGENTS = cast(Table, Agent.__table__)
AUDIT_LOGS = cast(Table, AuditLog.__table__)


def audit_count(dl: DataLayer) -> int:
    with dl.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(AuditLog)).scalar_one())


def make_agent(dl: DataLayer, name: str = "guarded", role: str = "coder") -> uuid.UUID:
    with dl.unit_of_work() as uow:
        ident = uow.agents.create(name=name, role=role, capabilities=["code"]).id
        uow.commit()
    return ident


def rows_for(dl: DataLayer, ident: uuid.UUID) -> list[AuditLog]:
    with dl.unit_of_work(read_only=True) as uow:
        return list(uow.audit.history("agent", ident).items)


# -- plain SQL: PostgreSQL's parser decides ------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE/**/agents SET status = 'busy'",
        "UPDATE \"agents\" SET status = 'busy'",
        "UPDATE public.agents SET status = 'busy'",
        "update\n  agents\nset status = 'busy'",
        "WITH x AS (UPDATE agents SET status = 'busy' RETURNING id) SELECT count(*) FROM x",
        "SELECT 1; DELETE FROM agents",
        "DELETE FROM ONLY agents",
        "TRUNCATE TABLE tasks, agents CASCADE",
        "INSERT INTO agents (name, role) SELECT name || '2', role FROM agents",
        "MERGE INTO agents a USING (SELECT 1) s ON true WHEN MATCHED THEN DELETE",
        "ALTER TABLE agents DISABLE TRIGGER ALL",
        "DO $$ BEGIN UPDATE agents SET status = 'busy'; END $$",
        "EXECUTE some_prepared_statement",
        "UPDATE agents SET status = 'busy' WHERE name = :name",
        "this is not SQL at all",
    ],
)
def test_plain_sql_that_writes_or_hides_a_tracked_table_is_refused(
    data_layer: DataLayer, sql: str
) -> None:
    ident = make_agent(data_layer)
    with pytest.raises(UncapturedWriteError), data_layer.unit_of_work() as uow:
        uow.session.execute(text(sql), {"name": "guarded"} if ":name" in sql else None)
    with data_layer.unit_of_work(read_only=True) as uow:
        assert uow.agents.get_or_raise(ident).status == "idle"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM agents WHERE name = :name",
        "SELECT count(*) FROM agents a JOIN tasks t ON t.agent_id = a.id",
        "SELECT 'UPDATE agents SET status = 1' AS looks_like_a_write",
        "UPDATE pg_temp_table_that_is_not_ours SET x = 1 WHERE false",
    ],
)
def test_plain_sql_that_only_reads_tracked_tables_runs(data_layer: DataLayer, sql: str) -> None:
    with data_layer.unit_of_work() as uow:
        if "pg_temp" in sql:
            uow.session.execute(text("CREATE TEMP TABLE pg_temp_table_that_is_not_ours (x int)"))
        uow.session.execute(text(sql), {"name": "x"} if ":name" in sql else None)


# -- audit rows come from the trail only ------------------------------------------------------


def forged() -> dict[str, Any]:
    return {"action": "delete", "actor_type": "user", "resource_type": "agent", "resource_id": "x"}


def forge(session: OrmSession, how: str) -> None:
    """Try to write ``audit_logs`` through ``session`` in the way ``how`` names."""
    if how == "orm-add":
        session.add(AuditLog(**forged()))
        session.flush()
    elif how == "insert-model":
        session.execute(insert(AuditLog).values(**forged()))
    elif how == "insert-table":
        session.execute(insert(AUDIT_LOGS).values(**forged()))
    elif how == "text-insert":
        session.execute(
            text(
                "INSERT INTO audit_logs (action, actor_type, resource_type) "
                "VALUES ('delete', 'user', 'agent')"
            )
        )
    elif how == "text-update":
        session.execute(text("UPDATE audit_logs SET action = 'create'"))
    elif how == "text-delete":
        session.execute(text("DELETE FROM audit_logs"))
    elif how == "text-truncate":
        session.execute(text("TRUNCATE audit_logs"))
    elif how == "switch-then-delete":
        session.execute(text("SET LOCAL orchestrator_data.audit_prune = 'on'"))
        session.execute(text("DELETE FROM audit_logs"))
    elif how == "update-model":
        session.execute(update(AuditLog).values(action="create"))
    elif how == "delete-model":
        session.execute(delete(AuditLog))


@pytest.mark.parametrize(
    "how",
    [
        "orm-add",
        "insert-model",
        "insert-table",
        "text-insert",
        "text-update",
        "text-delete",
        "text-truncate",
        "switch-then-delete",
        "update-model",
        "delete-model",
    ],
)
def test_audit_rows_cannot_be_forged_or_removed_through_a_session(
    data_layer: DataLayer, how: str
) -> None:
    make_agent(data_layer)
    before = audit_count(data_layer)
    with (
        pytest.raises(UncapturedWriteError, match="audit trail only"),
        data_layer.unit_of_work() as uow,
    ):
        forge(uow.session, how)
        uow.commit()
    assert audit_count(data_layer) == before


# -- every other form of write is captured -------------------------------------------------


def test_core_table_statements_are_audited_and_invalidate_cached_queries(
    data_layer: DataLayer,
) -> None:
    table = AGENTS
    with data_layer.unit_of_work(read_only=True) as uow:
        assert uow.agents.count(role="core") == 0  # cached now
    new_id = uuid.uuid4()
    with data_layer.unit_of_work(actor=Actor("user", "core")) as uow:
        uow.session.execute(insert(table).values(id=new_id, name="core-1", role="core"))
        uow.commit()
    with data_layer.unit_of_work(read_only=True) as uow:
        assert uow.agents.count(role="core") == 1
    [created] = rows_for(data_layer, new_id)
    assert (created.action, created.actor_id) == ("create", "core")
    assert created.new_value is not None and created.new_value["name"] == "core-1"

    with data_layer.unit_of_work() as uow:
        uow.session.execute(update(table).where(table.c.id == new_id).values(status="busy"))
        uow.commit()
    with data_layer.unit_of_work(read_only=True) as uow:
        assert uow.agents.list(status="busy").items[0].id == new_id
    updated = rows_for(data_layer, new_id)[-1]
    assert (updated.action, updated.old_value, updated.new_value) == (
        "update",
        {"status": "idle"},
        {"status": "busy"},
    )

    with data_layer.unit_of_work() as uow:
        uow.session.execute(delete(table).where(table.c.name == "core-1"))
        uow.commit()
    with data_layer.unit_of_work(read_only=True) as uow:
        assert uow.agents.count(role="core") == 0
    assert rows_for(data_layer, new_id)[-1].action == "delete"


def test_multi_row_values_insert_works_and_audits_every_row(data_layer: DataLayer) -> None:
    with data_layer.unit_of_work() as uow:
        uow.session.execute(
            insert(Agent).values(
                [{"name": "mv-1", "role": "multi"}, {"name": "mv-2", "role": "multi"}]
            )
        )
        uow.session.execute(insert(AGENTS).values([{"name": "mv-3", "role": "multi"}]))
        uow.commit()
    with data_layer.unit_of_work(read_only=True) as uow:
        agents = uow.agents.list(role="multi").items
        assert sorted(a.name for a in agents) == ["mv-1", "mv-2", "mv-3"]
        for agent in agents:
            assert [r.action for r in uow.audit.history("agent", agent.id).items] == ["create"]


@pytest.mark.parametrize("form", ["model", "table", "executemany"])
def test_an_upsert_records_the_updated_row_as_an_update_with_its_old_values(
    data_layer: DataLayer, form: str
) -> None:
    existing = make_agent(data_layer, name="up-1", role="before")
    with data_layer.unit_of_work(read_only=True) as uow:
        assert uow.agents.count(role="after") == 0  # cached now
    target: type[Agent] | Table = Agent if form != "table" else AGENTS
    rows = [{"name": "up-1", "role": "after"}, {"name": "up-2", "role": "after"}]
    with data_layer.unit_of_work() as uow:
        statement = pg_insert(target)
        statement = statement.on_conflict_do_update(
            index_elements=["name"], set_={"role": statement.excluded.role}
        )
        if form == "executemany":
            uow.session.execute(statement, rows)
        else:
            uow.session.execute(statement.values(rows))
        uow.commit()
    with data_layer.unit_of_work(read_only=True) as uow:
        assert uow.agents.count(role="after") == 2
        fresh = next(a for a in uow.agents.list(role="after").items if a.name == "up-2")
    history = rows_for(data_layer, existing)
    assert [r.action for r in history] == ["create", "update"]
    assert history[-1].old_value == {"role": "before"}
    assert history[-1].new_value == {"role": "after"}
    assert [r.action for r in rows_for(data_layer, fresh.id)] == ["create"]


def test_an_upsert_that_does_nothing_records_only_the_inserted_rows(data_layer: DataLayer) -> None:
    existing = make_agent(data_layer, name="dn-1")
    with data_layer.unit_of_work() as uow:
        uow.session.execute(
            pg_insert(Agent)
            .values([{"name": "dn-1", "role": "x"}, {"name": "dn-2", "role": "x"}])
            .on_conflict_do_nothing(index_elements=["name"])
        )
        uow.commit()
    assert [r.action for r in rows_for(data_layer, existing)] == ["create"]
    with data_layer.unit_of_work(read_only=True) as uow:
        [fresh] = uow.agents.list(role="x").items
    assert [r.action for r in rows_for(data_layer, fresh.id)] == ["create"]


# -- the database itself, as an application role that does not own audit_logs -------------


@pytest.fixture
def app_role(data_layer: DataLayer) -> Iterator[str]:
    """A login role with every privilege an application needs on the tables
    (all of them, on every table), that owns nothing."""
    name = f"od_app_{uuid.uuid4().hex[:8]}"
    database = data_layer.engine.url.database
    with data_layer.engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {name} LOGIN"))
        conn.execute(text(f"GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA public TO {name}"))
        conn.execute(text(f"GRANT USAGE ON SCHEMA public TO {name}"))
    try:
        # The embedded PostgreSQL 15 (peer authentication) lets the OS user
        # log in as postgres only: no second role to test with there.
        probe = psql(data_layer, name, "SELECT 1")
        if probe.returncode != 0 and "authentication failed" in probe.stderr:
            pytest.skip("this server lets the test log in as no role but its own")
        yield name
    finally:
        with data_layer.engine.begin() as conn:
            conn.execute(text(f"REASSIGN OWNED BY {name} TO CURRENT_USER"))
            conn.execute(text(f"DROP OWNED BY {name}"))
            conn.execute(text(f"DROP ROLE {name}"))
        assert database is not None


def psql(dl: DataLayer, role: str, sql: str) -> subprocess.CompletedProcess[str]:
    url = dl.engine.url
    exe = shutil.which("psql")
    assert exe is not None
    host = url.host or str(url.query.get("host") or "127.0.0.1")  # a socket folder, embedded
    command = [exe, "-X", "-v", "ON_ERROR_STOP=1", "-h", host]
    command += ["-p", str(url.port or 5432), "-U", role, "-d", url.database or "", "-c", sql]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("psql") is None, reason="needs the psql client")
@pytest.mark.parametrize(
    ("sql", "refused_with"),
    [
        ("UPDATE audit_logs SET action = 'create'", "append-only"),
        ("DELETE FROM audit_logs", "append-only"),
        ("TRUNCATE audit_logs", "append-only"),
        ("SET orchestrator_data.audit_prune = 'on'; DELETE FROM audit_logs", "append-only"),
        ("SET ROLE orchestrator_data_retention; DELETE FROM audit_logs", "permission denied"),
        (
            "SELECT * FROM prune_audit_logs('1 second', 'user', 'x', NULL, '{}')",
            "permission denied",
        ),
        ("ALTER TABLE audit_logs DISABLE TRIGGER ALL", "must be owner"),
    ],
)
def test_the_application_role_cannot_remove_audit_rows(
    data_layer: DataLayer, app_role: str, sql: str, refused_with: str
) -> None:
    make_agent(data_layer)
    before = audit_count(data_layer)
    out = psql(data_layer, app_role, sql)
    assert out.returncode != 0, out.stdout
    assert refused_with in out.stderr
    assert audit_count(data_layer) == before


def test_a_data_layer_runs_as_the_application_role(
    data_layer: DataLayer, od_settings: Settings, app_role: str
) -> None:
    url = make_url(str(od_settings.database_url)).set(username=app_role)
    settings = Settings(
        database_url=url.render_as_string(hide_password=False),
        redis_url=od_settings.redis_url,
        key_prefix=od_settings.key_prefix,
        warm_pool=False,
    )
    with DataLayer(settings) as dl:
        ident = make_agent(dl, name="as-app")
        assert [r.action for r in rows_for(dl, ident)] == ["create"]
