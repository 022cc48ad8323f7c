"""Retention and reading the trail from the command line: ``audit prune``
and ``audit show``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, text
from sqlalchemy.exc import DBAPIError

from fixtures.pytest_plugin import Servers
from orchestrator_data import Actor, DataLayer
from orchestrator_data.audit.retention import prune_audit_log
from orchestrator_data.models import AuditLog


def run_cli(
    od_database_url: str, od_servers: Servers, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": od_database_url, "REDIS_URL": od_servers.redis_url}
    exe = shutil.which("orchestrator-data")
    cmd = [exe] if exe else [sys.executable, "-m", "orchestrator_data"]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=120)


def _backdate(dl: DataLayer, days: int, n: int) -> None:
    # Old rows, as the trail would have written them long ago: straight on a
    # connection (through a session, audit rows are refused), INSERT being
    # the one statement the append-only table takes.
    when = datetime.now(timezone.utc) - timedelta(days=days)
    rows = [
        {
            "action": "update",
            "actor_type": "system",
            "resource_type": "agent",
            "resource_id": f"old-{days}-{i}",
            "timestamp": when + timedelta(seconds=i),
        }
        for i in range(n)
    ]
    with dl.engine.begin() as conn:
        conn.execute(insert(AuditLog), rows)


def test_prune_deletes_old_rows_and_audits_itself(data_layer: DataLayer) -> None:
    _backdate(data_layer, 200, 3)
    _backdate(data_layer, 10, 2)
    with data_layer.unit_of_work(actor=Actor("user", "ops")) as uow:
        result = prune_audit_log(uow, timedelta(days=90))
        uow.commit()
    assert result.deleted == 3
    with data_layer.unit_of_work(read_only=True) as uow:
        left = uow.audit.list(limit=100).items
    assert sorted(r.resource_id or "" for r in left if r.action == "update") == [
        "old-10-0",
        "old-10-1",
    ]
    [prune] = [r for r in left if r.action == "prune"]
    assert (prune.actor_type, prune.actor_id, prune.resource_type) == ("user", "ops", "audit_log")
    assert prune.old_value is not None
    assert prune.old_value["rows"] == 3
    assert datetime.fromisoformat(prune.old_value["oldest"]) == result.oldest
    assert prune.metadata_["older_than_seconds"] == 90 * 86400
    assert "txid" in prune.metadata_

    # Pruning opened nothing: the next DELETE on the pool's connections is
    # still refused by the table's trigger.
    with pytest.raises(DBAPIError, match="append-only"), data_layer.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_logs"))


def test_prune_cli(data_layer: DataLayer, od_database_url: str, od_servers: Servers) -> None:
    _backdate(data_layer, 100, 4)
    out = run_cli(od_database_url, od_servers, "audit", "prune", "--older-than", "90d")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("pruned 4 audit rows written before ")
    with data_layer.unit_of_work(read_only=True) as uow:
        [prune] = uow.audit.by_action("prune").items
        assert prune.actor_type in ("user", "system")
        assert uow.audit.count(action="update") == 0


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ("90", "is not a duration like 90d, 12h, 30m"),
        ("ninety", "is not a duration like 90d, 12h, 30m"),
        ("90x", "is not a duration like 90d, 12h, 30m"),
        ("-1d", "is not a duration like 90d, 12h, 30m"),
        ("1.5h", "is not a duration like 90d, 12h, 30m"),
        ("0d", "'0d' must be positive"),
        ("0s", "'0s' must be positive"),
        ("99999999999d", "is too long: at most 999999999 days"),
    ],
)
def test_prune_cli_refuses_bad_durations(
    bad: str, said: str, od_database_url: str, od_servers: Servers
) -> None:
    out = run_cli(od_database_url, od_servers, "audit", "prune", "--older-than", bad)
    assert out.returncode == 2
    assert "--older-than" in out.stderr
    assert said in out.stderr
    assert "Traceback" not in out.stderr


def test_show_prints_field_level_history(
    data_layer: DataLayer, od_database_url: str, od_servers: Servers
) -> None:
    with data_layer.unit_of_work(actor=Actor("user", "fay", "10.0.0.7")) as uow:
        agent = uow.agents.create(name="shown", role="coder", capabilities=["code"])
        uow.commit()
    with data_layer.unit_of_work(actor=Actor("agent", "bot")) as uow:
        uow.agents.update(agent.id, status="busy", capabilities=["code", "review"])
        uow.commit()
    out = run_cli(od_database_url, od_servers, "audit", "show", str(agent.id))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["TIME", "(UTC)", "ACTION", "ACTOR", "FIELD", "OLD", "NEW"]
    create = [line for line in lines if " create " in line]
    assert len(create) == 1
    assert "user:fay@10.0.0.7" in create[0]
    update = next(i for i, line in enumerate(lines) if " update " in line)
    assert "agent:bot" in lines[update]
    changed = lines[update : update + 2]
    status = next(line for line in changed if " status " in line)
    assert status.split()[-2:] == ['"idle"', '"busy"']
    caps = next(line for line in changed if " capabilities " in line)
    assert caps.endswith('["code"]  ["code", "review"]')
    assert len(lines) == update + 2  # only the changed fields, nothing else

    missing = run_cli(od_database_url, od_servers, "audit", "show", "no-such-id")
    assert missing.returncode == 1
    assert "no audit rows for no-such-id" in missing.stderr
