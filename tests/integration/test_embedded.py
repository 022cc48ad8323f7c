"""The embedded servers, for real: start, share between processes, stop, recover."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy

from orchestrator_data.embedded import PG_MODE_ENV, EmbeddedServers, start_embedded
from orchestrator_data.errors import EmbeddedServerError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]

# A process that takes a handle, prints its URLs, then releases on a line on stdin.
HOLDER = """
import json, sys
from orchestrator_data.embedded import start_embedded
servers = start_embedded(sys.argv[1])
print(json.dumps([servers.database_url, servers.redis_url]), flush=True)
sys.stdin.readline()
servers.stop()
"""


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Under /tmp with a short name: the PostgreSQL unix socket path must stay short.
    path = Path(tempfile.mkdtemp(prefix="oe-", dir="/tmp"))
    yield path
    _kill_leftovers(path)
    shutil.rmtree(path, ignore_errors=True)


def _kill_leftovers(path: Path) -> None:
    """After a failed test: kill whatever still serves this folder."""
    port_file = path / "redis" / "port"
    marks = [str(path)] + ([f"127.0.0.1:{port_file.read_text()}"] if port_file.exists() else [])
    for pid, args in _processes():
        if any(mark in args for mark in marks):
            os.kill(pid, signal.SIGKILL)


def _processes() -> list[tuple[int, str]]:
    """Pid and command line of every live process (zombies left out: they serve nothing)."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,stat=,args="], capture_output=True, text=True)
    rows = [line.split(None, 2) for line in ps.stdout.splitlines()]
    return [(int(row[0]), row[2]) for row in rows if len(row) == 3 and not row[1].startswith("Z")]


def _postmasters(path: Path) -> list[str]:
    return [args for _, args in _processes() if f"-D {path / 'pg'}" in args]


def _redis_servers(redis_url: str) -> list[str]:
    # redis-server rewrites its title to "redis-server 127.0.0.1:<port>"
    title = "redis-server " + redis_url.removeprefix("redis://").removesuffix("/0")
    return [args for _, args in _processes() if args.startswith(title) or f"/{title}" in args]


def _query(database_url: str, sql: str) -> object:
    """Run ``sql`` in a transaction of its own; return the first value if it returns rows."""
    engine = sqlalchemy.create_engine(database_url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(sqlalchemy.text(sql))
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def _redis(redis_url: str) -> redis.Redis[bytes]:
    return redis.Redis.from_url(redis_url, socket_connect_timeout=2)


def _assert_stopped(servers: EmbeddedServers) -> None:
    assert not (servers.data_dir / "pg" / "postmaster.pid").exists()
    assert not (servers.data_dir / "redis" / "redis.pid").exists()
    assert _postmasters(servers.data_dir) == []
    assert _redis_servers(servers.redis_url) == []
    with pytest.raises(sqlalchemy.exc.OperationalError):
        _query(servers.database_url, "select 1")
    with pytest.raises(redis.ConnectionError):
        _redis(servers.redis_url).ping()


def _spawn_holder(path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _urls_of(holder: subprocess.Popen[str]) -> list[str]:
    assert holder.stdout is not None
    line = holder.stdout.readline()
    assert line, f"holder exited with {holder.wait()}"
    urls: list[str] = json.loads(line)
    return urls


def _release(holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.wait(timeout=120) == 0


def test_start_connect_stop(data_dir: Path) -> None:
    servers = start_embedded(data_dir / "nested")

    assert servers.data_dir == data_dir / "nested"
    assert (servers.data_dir / "pg" / "PG_VERSION").exists()
    assert (servers.data_dir / "redis" / "port").exists()
    assert servers.database_url.startswith("postgresql+psycopg2://postgres@")
    assert servers.redis_url.startswith("redis://127.0.0.1:")
    assert _query(servers.database_url, "select 1") == 1
    assert _redis(servers.redis_url).ping()
    config = _redis(servers.redis_url).config_get("*")
    assert (config["appendonly"], config["appendfsync"]) == ("yes", "everysec")
    assert config["maxmemory"] == str(512 * 1024 * 1024)
    assert config["maxmemory-policy"] == "noeviction"

    servers.stop()
    _assert_stopped(servers)
    servers.stop()  # a second stop is harmless


def test_restart_reuses_data(data_dir: Path) -> None:
    first = start_embedded(data_dir)
    _query(first.database_url, "create table kept (v int); insert into kept values (42)")
    _redis(first.redis_url).set("kept", "yes")
    first.stop()

    second = start_embedded(data_dir)
    try:
        assert _query(second.database_url, "select v from kept") == 42
        assert _redis(second.redis_url).get("kept") == b"yes"
    finally:
        second.stop()
    _assert_stopped(second)


def test_handles_in_one_process_share_the_servers(data_dir: Path) -> None:
    first = start_embedded(data_dir)
    second = start_embedded(data_dir)
    assert (first.database_url, first.redis_url) == (second.database_url, second.redis_url)

    first.stop()
    assert _query(second.database_url, "select 1") == 1
    assert _redis(second.redis_url).ping()
    second.stop()
    _assert_stopped(second)


def test_concurrent_processes_share_one_pair_of_servers(data_dir: Path) -> None:
    holders = [_spawn_holder(data_dir), _spawn_holder(data_dir)]
    try:
        urls = [_urls_of(holder) for holder in holders]
        assert urls[0] == urls[1]
        database_url, redis_url = urls[0]
        assert len(_postmasters(data_dir)) == 1
        assert len(_redis_servers(redis_url)) == 1

        _release(holders[0])
        assert _query(database_url, "select 1") == 1
        assert _redis(redis_url).ping()

        _release(holders[1])
        _assert_stopped(EmbeddedServers(database_url, redis_url, data_dir))
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def test_killed_holder_does_not_keep_the_servers_alive(data_dir: Path) -> None:
    holder = _spawn_holder(data_dir)
    database_url, redis_url = _urls_of(holder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()

    servers = start_embedded(data_dir)
    assert (servers.database_url, servers.redis_url) == (database_url, redis_url)
    assert len(_postmasters(data_dir)) == 1

    servers.stop()  # the dead holder's pid is pruned, so this was the last handle
    _assert_stopped(servers)


def test_stale_redis_pidfile_is_recovered(data_dir: Path) -> None:
    first = start_embedded(data_dir)
    _redis(first.redis_url).set("survives", "aof")
    time.sleep(1.5)  # appendfsync everysec
    pidfile = data_dir / "redis" / "redis.pid"
    old_pid = int(pidfile.read_text())
    os.kill(old_pid, signal.SIGKILL)
    while _redis_servers(first.redis_url):
        time.sleep(0.05)
    assert pidfile.exists()  # left behind by the killed server

    second = start_embedded(data_dir)
    try:
        assert int(pidfile.read_text()) != old_pid
        assert _redis(second.redis_url).get("survives") == b"aof"
        assert _query(second.database_url, "select 1") == 1
    finally:
        first.stop()
        second.stop()
    _assert_stopped(second)


@pytest.mark.skipif(
    not shutil.which("pg_ctl") and not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")),
    reason="no PostgreSQL binaries on this machine",
)
def test_binaries_fallback(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PG_MODE_ENV, "binaries")
    servers = start_embedded(data_dir)
    try:
        (postmaster,) = _postmasters(data_dir)
        assert "pgserver" not in postmaster  # the bundled server lives under pgserver/pginstall
        assert _query(servers.database_url, "select current_user") == "postgres"
        assert _query(servers.database_url, "show listen_addresses") == ""
        assert _redis(servers.redis_url).ping()
    finally:
        servers.stop()
    _assert_stopped(servers)


def test_unknown_pg_mode_is_rejected(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PG_MODE_ENV, "docker")
    with pytest.raises(EmbeddedServerError, match=PG_MODE_ENV):
        start_embedded(data_dir)
    # Redis had started first; with no handle left it was stopped again.
    assert not (data_dir / "redis" / "port").exists()
    assert not (data_dir / "redis" / "redis.pid").exists()
