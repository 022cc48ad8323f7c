"""The command line as a newcomer meets it: finding ids in the audit trail
with ``audit recent``, and the demo's report in a log or a pipe."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta

from fixtures.pytest_plugin import Servers
from orchestrator_data import Actor, CacheTTLs, DataLayer, Settings
from orchestrator_data.audit.retention import prune_audit_log


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("orchestrator-data")
    cmd = [exe] if exe else [sys.executable, "-m", "orchestrator_data"]
    return subprocess.run(
        [*cmd, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def servers_env(od_database_url: str, od_servers: Servers) -> dict[str, str]:
    return {"DATABASE_URL": od_database_url, "REDIS_URL": od_servers.redis_url}


def test_audit_recent_lists_the_newest_rows_with_their_ids(
    data_layer: DataLayer, od_database_url: str, od_servers: Servers
) -> None:
    env = servers_env(od_database_url, od_servers)
    with data_layer.unit_of_work(actor=Actor("user", "ana")) as uow:
        first = uow.agents.create(name="recent-1", role="coder", capabilities=["code"])
        uow.commit()
    with data_layer.unit_of_work(actor=Actor("user", "ben")) as uow:
        task = uow.tasks.create(type="summarize", payload={"n": 1})
        uow.agents.update(first.id, status="busy")
        uow.commit()

    out = run_cli(env, "audit", "recent")
    assert out.returncode == 0, out.stderr
    header, *lines = out.stdout.splitlines()
    assert header.split() == [
        "TIME",
        "(UTC)",
        "ACTION",
        "TYPE",
        "RESOURCE",
        "ID",
        "ACTOR",
        "FIELDS",
    ]
    assert len(lines) == 3
    # Newest first; the ids are the ones 'audit show' takes.
    assert lines[-1].split()[2:6] == ["create", "agent", str(first.id), "user:ana"]
    assert {tuple(line.split()[2:5]) for line in lines[:2]} == {
        ("update", "agent", str(first.id)),
        ("create", "task", str(task.id)),
    }
    update = next(line for line in lines if " update " in line)
    assert update.rstrip().endswith("status")  # the fields the row touched

    shown = run_cli(env, "audit", "show", str(first.id))
    assert shown.returncode == 0 and " update " in shown.stdout

    only_tasks = run_cli(env, "audit", "recent", "--type", "task", "--limit", "5")
    assert only_tasks.returncode == 0, only_tasks.stderr
    assert [line.split()[3] for line in only_tasks.stdout.splitlines()[1:]] == ["task"]

    limited = run_cli(env, "audit", "recent", "--limit", "1")
    assert len(limited.stdout.splitlines()) == 2

    none = run_cli(env, "audit", "recent", "--type", "session")
    assert none.returncode == 0 and none.stdout.strip() == "no session audit rows yet"


def test_audit_recent_shows_what_a_prune_removed(
    data_layer: DataLayer, od_database_url: str, od_servers: Servers
) -> None:
    with data_layer.unit_of_work() as uow:
        uow.agents.create(name="pruned-away", role="coder", capabilities=["code"])
        uow.commit()
    with data_layer.unit_of_work(actor=Actor("user", "ops")) as uow:
        prune_audit_log(uow, timedelta(seconds=1) * 1e-6)
        uow.commit()
    out = run_cli(
        servers_env(od_database_url, od_servers), "audit", "recent", "--type", "audit_log"
    )
    assert out.returncode == 0, out.stderr
    [line] = out.stdout.splitlines()[1:]
    assert line.split()[2:6] == ["prune", "audit_log", "-", "user:ops"]
    assert re.search(r"1 rows written before \d{4}-\d\d-\d\dT", line)


def test_show_without_rows_says_where_ids_come_from(
    data_layer: DataLayer, od_database_url: str, od_servers: Servers
) -> None:
    out = run_cli(servers_env(od_database_url, od_servers), "audit", "show", "no-such-id")
    assert out.returncode == 1
    assert "'orchestrator-data audit recent' lists ids" in out.stderr


def test_demo_in_a_pipe_prints_the_report_alone_and_this_runs_leaderboard(
    od_database_url: str, od_servers: Servers, od_settings: Settings
) -> None:
    env = {
        **servers_env(od_database_url, od_servers),
        "ORCHESTRATOR_KEY_PREFIX": od_settings.key_prefix + "demo:",
    }
    args = ("demo", "--agents", "3", "--tasks", "30", "--workers", "2", "--seed", "11")
    runs = [run_cli(env, *args) for _ in range(2)]
    for out in runs:
        assert out.returncode == 0, out.stderr
        # Not a terminal: no progress bar, and no stray label of one.
        assert "tasks done" not in out.stdout + out.stderr
    second = runs[1].stdout
    run_id = re.findall(r"^run (\w+): 3 agents, 30 tasks$", second, re.M)[0]
    assert "leaderboard of this run's agents" in second
    board = re.findall(r"^\s+\d+\. (\S+)\s+\d+ pts$", second, re.M)
    assert board, second
    # Only the second run's agents, though the first run's have points too.
    assert all(name.startswith(f"demo-{run_id}-agent-") for name in board)


def test_sessions_purge_deletes_expired_sessions(
    data_layer: DataLayer,
    make_data_layer: Callable[..., DataLayer],
    od_database_url: str,
    od_servers: Servers,
    od_settings: Settings,
) -> None:
    dl = make_data_layer(ttls=CacheTTLs(session=1), warm_pool=False)
    dl.session_store.create("user-1", {"cart": 1})
    dl.session_store.create("user-2", {"cart": 2})
    time.sleep(1.3)  # expired, and past the tenth of the TTL the purge allows for
    env = {
        **servers_env(od_database_url, od_servers),
        "ORCHESTRATOR_KEY_PREFIX": od_settings.key_prefix,
        "ORCHESTRATOR_TTL_SESSION": "1",
    }
    out = run_cli(env, "sessions", "purge")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "purged 2 expired sessions"
    assert run_cli(env, "sessions", "purge").stdout.strip() == "purged 0 expired sessions"
