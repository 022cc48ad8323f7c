"""The embedded servers, for real: start, share between processes, stop, recover; one
PostgreSQL cluster per major in a folder; what the CLI says while they start."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import sqlalchemy

from orchestrator_data.embedded import PG_MODE_ENV, EmbeddedServers, start_embedded
from orchestrator_data.embedded.postgres import choose_postgres
from orchestrator_data.errors import EmbeddedServerError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]

# A process that takes a handle, prints where the servers are, then releases on a line on stdin.
HOLDER = """
import json, sys
from orchestrator_data.embedded import start_embedded
s = start_embedded(sys.argv[1])
print(json.dumps([s.database_url, s.redis_url, str(s.postgres_dir), s.postgres_major]), flush=True)
sys.stdin.readline()
s.stop()
"""


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Under /tmp with a short name: the PostgreSQL unix socket path must stay short. mkdtemp
    # makes it 0700, which PostgreSQL's own user could not enter when the tests run as root (and
    # the embedded servers change no folder they did not make): open it as mkdir would.
    path = Path(tempfile.mkdtemp(prefix="oe-", dir="/tmp"))
    path.chmod(0o755)
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


def _postmasters(pgdata: Path) -> list[str]:
    """The servers running on the cluster ``pgdata`` (``-D pgdata``, not ``-D pgdata16``)."""
    return [args for _, args in _processes() if f" -D {pgdata} " in f"{args} "]


def _redis_port(redis_url: str) -> int:
    port = urlsplit(redis_url).port
    assert port is not None, "no port in the Redis URL"
    return port


def _redis_servers(redis_url: str) -> list[str]:
    # redis-server rewrites its title to "redis-server 127.0.0.1:<port>"
    title = f"redis-server 127.0.0.1:{_redis_port(redis_url)}"
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


@contextmanager
def _redis(redis_url: str) -> Iterator[redis.Redis]:
    with closing(redis.Redis.from_url(redis_url, socket_connect_timeout=2)) as client:
        yield client


def _redis_ping(redis_url: str) -> bool:
    with _redis(redis_url) as client:
        return bool(client.ping())


def _assert_stopped(servers: EmbeddedServers) -> None:
    assert not (servers.postgres_dir / "postmaster.pid").exists()
    assert not (servers.data_dir / "redis" / "redis.pid").exists()
    assert _postmasters(servers.postgres_dir) == []
    assert _redis_servers(servers.redis_url) == []
    with pytest.raises(sqlalchemy.exc.OperationalError):
        _query(servers.database_url, "select 1")
    with pytest.raises(redis.ConnectionError):
        _redis_ping(servers.redis_url)


@contextmanager
def _holding(path: Path, **env: str) -> Iterator[subprocess.Popen[str]]:
    """A holder process on ``path``; killed if still running at the end, its pipes closed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )
    with holder:  # closes the pipes and waits
        try:
            yield holder
        finally:
            if holder.poll() is None:
                holder.kill()


def _servers_of(holder: subprocess.Popen[str], path: Path) -> EmbeddedServers:
    """What the holder holds (as a handle of its own that this process cannot release)."""
    assert holder.stdout is not None
    line = holder.stdout.readline()
    assert line, f"holder exited with {holder.wait()}"
    database_url, redis_url, postgres_dir, major = json.loads(line)
    return EmbeddedServers(database_url, redis_url, path, Path(postgres_dir), major)


def _release(holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.wait(timeout=120) == 0


def _version(servers: EmbeddedServers) -> str:
    return str(_query(servers.database_url, "select version()"))


def _server_major(mode: str) -> int | None:
    """The PostgreSQL major that ``ORCHESTRATOR_EMBEDDED_PG=mode`` runs here, or None."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(PG_MODE_ENV, mode)
        try:
            return choose_postgres().major
        except EmbeddedServerError:
            return None


def test_start_connect_stop(data_dir: Path) -> None:
    servers = start_embedded(data_dir / "nested")

    assert servers.data_dir == data_dir / "nested"
    assert servers.postgres_dir == servers.data_dir / f"pg{servers.postgres_major}"
    assert (servers.postgres_dir / "PG_VERSION").read_text().strip() == str(servers.postgres_major)
    assert _version(servers).startswith(f"PostgreSQL {servers.postgres_major}.")
    assert (servers.data_dir / "redis" / "port").exists()
    assert servers.database_url.startswith("postgresql+psycopg2://postgres@")
    assert re.fullmatch(r"redis://:[\w-]{43}@127\.0\.0\.1:\d+/0", servers.redis_url)
    assert _query(servers.database_url, "select 1") == 1
    assert _redis_ping(servers.redis_url)
    with _redis(servers.redis_url) as client:
        info = client.info("persistence") | client.info("memory")
        # CONFIG is renamed away (tests/integration/test_embedded_security.py): read the file.
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.config_get("*")
    assert info["aof_enabled"] == 1
    assert info["maxmemory"] == 512 * 1024 * 1024
    assert info["maxmemory_policy"] == "noeviction"
    config = (servers.data_dir / "redis" / "redis.conf").read_text().splitlines()
    assert {"appendonly yes", "appendfsync everysec", 'save ""'} <= set(config)

    servers.stop()
    _assert_stopped(servers)
    servers.stop()  # a second stop is harmless


def test_restart_reuses_data(data_dir: Path) -> None:
    first = start_embedded(data_dir)
    _query(first.database_url, "create table kept (v int); insert into kept values (42)")
    with _redis(first.redis_url) as client:
        client.set("kept", "yes")
    first.stop()

    second = start_embedded(data_dir)
    try:
        assert _query(second.database_url, "select v from kept") == 42
        with _redis(second.redis_url) as client:
            assert client.get("kept") == b"yes"
    finally:
        second.stop()
    _assert_stopped(second)


def test_handles_in_one_process_share_the_servers(data_dir: Path) -> None:
    first = start_embedded(data_dir)
    second = start_embedded(data_dir)
    assert (first.database_url, first.redis_url) == (second.database_url, second.redis_url)

    first.stop()
    assert _query(second.database_url, "select 1") == 1
    assert _redis_ping(second.redis_url)
    second.stop()
    _assert_stopped(second)


def test_concurrent_processes_share_one_pair_of_servers(data_dir: Path) -> None:
    with _holding(data_dir) as one, _holding(data_dir) as two:
        first, second = _servers_of(one, data_dir), _servers_of(two, data_dir)
        assert first == second
        assert len(_postmasters(first.postgres_dir)) == 1
        assert len(_redis_servers(first.redis_url)) == 1

        _release(one)
        assert _query(first.database_url, "select 1") == 1
        assert _redis_ping(first.redis_url)

        _release(two)
        _assert_stopped(first)


def test_killed_holder_does_not_keep_the_servers_alive(data_dir: Path) -> None:
    with _holding(data_dir) as holder:
        held = _servers_of(holder, data_dir)
        holder.send_signal(signal.SIGKILL)

    servers = start_embedded(data_dir)
    assert servers == held
    assert len(_postmasters(servers.postgres_dir)) == 1

    servers.stop()  # the dead holder's pid is pruned, so this was the last handle
    _assert_stopped(servers)


def test_stale_redis_pidfile_is_recovered(data_dir: Path) -> None:
    first = start_embedded(data_dir)
    with _redis(first.redis_url) as client:
        client.set("survives", "aof")
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
        with _redis(second.redis_url) as client:
            assert client.get("survives") == b"aof"
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
        (postmaster,) = _postmasters(servers.postgres_dir)
        assert "pgserver" not in postmaster  # the bundled server lives under pgserver/pginstall
        assert servers.postgres_major == _server_major("binaries")
        assert _version(servers).startswith(f"PostgreSQL {servers.postgres_major}.")
        assert _query(servers.database_url, "select current_user") == "postgres"
        assert _query(servers.database_url, "show listen_addresses") == ""
        assert _redis_ping(servers.redis_url)
    finally:
        servers.stop()
    _assert_stopped(servers)


def test_unknown_pg_mode_is_rejected(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PG_MODE_ENV, "docker")
    with pytest.raises(EmbeddedServerError, match=PG_MODE_ENV):
        start_embedded(data_dir)
    assert list(data_dir.iterdir()) == []  # refused before anything started


def test_a_cluster_that_cannot_start_leaves_nothing_running(data_dir: Path) -> None:
    major = choose_postgres().major
    (data_dir / f"pg{major}").mkdir()
    (data_dir / f"pg{major}" / "PG_VERSION").write_text(f"{major}\n")  # and nothing else
    with pytest.raises(EmbeddedServerError, match=f"pg{major}"):
        start_embedded(data_dir)
    # Redis had started first; with no handle left it was stopped again.
    assert not (data_dir / "redis" / "port").exists()
    assert not (data_dir / "redis" / "redis.pid").exists()
    assert json.loads((data_dir / ".handles.json").read_text()) == []
    assert json.loads((data_dir / f".handles.pg{major}.json").read_text()) == []


# --- one cluster per PostgreSQL major ---------------------------------------------------------


def test_two_majors_share_one_folder_at_the_same_time(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pgserver's bundled server on Python <= 3.12 and the machine's on 3.13, for instance.
    bundled, machine = _server_major("pgserver"), _server_major("binaries")
    if bundled is None or machine is None or bundled == machine:
        pytest.skip(f"needs two PostgreSQL majors (pgserver: {bundled}, binaries: {machine})")
    monkeypatch.setenv(PG_MODE_ENV, "pgserver")
    ours = start_embedded(data_dir)
    try:
        with _holding(data_dir, **{PG_MODE_ENV: "binaries"}) as holder:
            theirs = _servers_of(holder, data_dir)
            assert (ours.postgres_dir, theirs.postgres_dir) == (
                data_dir / f"pg{bundled}",
                data_dir / f"pg{machine}",
            )
            assert _version(ours).startswith(f"PostgreSQL {bundled}.")
            assert _version(theirs).startswith(f"PostgreSQL {machine}.")
            assert ours.redis_url == theirs.redis_url  # one Redis for the folder
            assert [len(_postmasters(s.postgres_dir)) for s in (ours, theirs)] == [1, 1]

            # This process joins the other major too: one process, two clusters.
            monkeypatch.setenv(PG_MODE_ENV, "binaries")
            also = start_embedded(data_dir)
            assert also == theirs

            _release(holder)  # this process still holds both clusters
            assert _version(also).startswith(f"PostgreSQL {machine}.")

        also.stop()  # the last handle on that cluster stops it, and only it
        assert _postmasters(theirs.postgres_dir) == []
        assert not (theirs.postgres_dir / "postmaster.pid").exists()
        assert _query(ours.database_url, "select 1") == 1
        assert _redis_ping(ours.redis_url)
    finally:
        ours.stop()
    _assert_stopped(ours)


def test_a_legacy_pg_folder_is_used_when_its_major_matches(data_dir: Path) -> None:
    # A pg/ cluster of another major (9.6 here) is left alone.
    (data_dir / "pg").mkdir()
    (data_dir / "pg" / "PG_VERSION").write_text("9.6\n")
    first = start_embedded(data_dir)
    major = first.postgres_major
    _query(first.database_url, "create table kept (v int); insert into kept values (42)")
    first.stop()
    assert first.postgres_dir == data_dir / f"pg{major}"
    assert sorted(p.name for p in (data_dir / "pg").iterdir()) == ["PG_VERSION"]

    # The layout of the releases before one cluster per major: the cluster right in pg/.
    shutil.rmtree(data_dir / "pg")
    first.postgres_dir.rename(data_dir / "pg")
    second = start_embedded(data_dir)
    try:
        assert second.postgres_dir == data_dir / "pg"
        assert not first.postgres_dir.exists()
        assert _query(second.database_url, "select v from kept") == 42
    finally:
        second.stop()
    _assert_stopped(second)


# --- what the CLI says --------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI on the embedded servers: no DATABASE_URL / REDIS_URL in its environment."""
    unset = {"DATABASE_URL", "REDIS_URL", "ORCHESTRATOR_DATA_DIR"}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator_data", *args],
        env={**env, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("current: ")  # migrate status ran
    return out


def test_the_cli_says_what_starts_and_when_it_is_ready(data_dir: Path) -> None:
    major = choose_postgres().major
    redis_dir, pgdata = data_dir / "redis", data_dir / f"pg{major}"
    starting = [
        f"starting embedded Redis in {redis_dir} ...",
        r"embedded Redis ready on 127\.0\.0\.1:\d+ \(\d+\.\d s\)",
        f"starting embedded PostgreSQL {major} in {pgdata} (new cluster) ...",
        rf"embedded PostgreSQL {major} ready \(\d+\.\d s\)",
    ]
    first = _cli("--data-dir", str(data_dir), "migrate", "status").stderr.splitlines()
    assert len(first) == len(starting), first
    for line, expected in zip(first, starting, strict=True):
        assert line == expected or re.fullmatch(expected, line), first

    # -v: the same lines among INFO records, and none of pgserver's command lines and output
    # (they are DEBUG). A new cluster again, so that initdb's output would have shown.
    shutil.rmtree(pgdata)
    verbose = _cli("-v", "--data-dir", str(data_dir), "migrate", "status").stderr
    ours = [line for line in verbose.splitlines() if not line.startswith("INFO ")]
    assert len(ours) == len(starting), verbose
    for line, expected in zip(ours, starting, strict=True):
        assert line == expected or re.fullmatch(expected, line), verbose
    assert "INFO orchestrator_data.embedded: stopping embedded PostgreSQL" in verbose
    for chatter in ("pgserver:", "Running commandline", "stdout:", "initdb", "server started"):
        assert chatter not in verbose
    assert not [line for line in verbose.splitlines() if line.startswith("DEBUG ")]

    # Servers already running: one line each.
    held = start_embedded(data_dir)
    try:
        port = _redis_port(held.redis_url)
        again = _cli("--data-dir", str(data_dir), "migrate", "status").stderr.splitlines()
        assert again == [
            f"reusing embedded Redis on 127.0.0.1:{port}",
            f"reusing embedded PostgreSQL {major} in {pgdata}",
        ]
    finally:
        held.stop()
    _assert_stopped(held)
