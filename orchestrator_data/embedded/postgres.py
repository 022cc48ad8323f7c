"""The embedded PostgreSQL: pgserver, or initdb/pg_ctl binaries found on the machine."""

from __future__ import annotations

import atexit
import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from orchestrator_data.embedded._common import (
    NO_EXTRA,
    PG_MODE_ENV,
    TIMEOUT,
    WAIT,
    PostgresHandle,
    logger,
    pid_alive,
    prune_pid_list,
    tail,
)
from orchestrator_data.errors import EmbeddedServerError


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


def postmaster_url(pgdata: Path) -> str | None:
    """The SQLAlchemy URL of the server running on ``pgdata``, or None when none is ready."""
    info = _read_postmaster(pgdata)
    if info is None or info.status != "ready" or not pid_alive(info.pid):
        return None
    if not info.socket_dir:
        return f"postgresql+psycopg2://postgres@{info.host}:{info.port}/postgres"
    port = "" if info.port == 5432 else f"&port={info.port}"
    return f"postgresql+psycopg2://postgres@/postgres?host={quote(info.socket_dir, safe='/')}{port}"


def _clear_dead_postmaster(pgdata: Path) -> None:
    # PostgreSQL removes a stale postmaster.pid itself, but takes a zombie for a live server.
    info = _read_postmaster(pgdata)
    if info is not None and not pid_alive(info.pid):
        logger.info("removing postmaster.pid of dead server %d in %s", info.pid, pgdata)
        (pgdata / "postmaster.pid").unlink(missing_ok=True)


def open_postgres(pgdata: Path) -> PostgresHandle:
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
                    f"pgserver is not installed: {NO_EXTRA}, Python <= 3.12), or set DATABASE_URL"
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
                f"last lines of {pgdata / 'log'}: {tail(pgdata / 'log')}"
            ) from exc
        # Our handle owns the lifecycle: release() runs pgserver's cleanup, not its atexit hook.
        atexit.unregister(self._server._cleanup)

    def _prune_handles(self) -> None:
        # pgserver never forgets a pid, so a killed process would keep its server up forever.
        with self._cls._lock:
            prune_pid_list(self._pgdata / ".handle_pids.json")

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
            logger.info("initialising embedded PostgreSQL in %s", pgdata)
            self._run(
                "initdb", "--auth=trust", "--username=postgres", "--encoding=UTF8", "--no-locale"
            )
        if postmaster_url(pgdata) is not None:
            logger.info("reusing embedded PostgreSQL in %s", pgdata)
            return
        socket_dir = shlex.quote(str(self._socket_dir()))
        logger.info("starting embedded PostgreSQL in %s with %s", pgdata, self._bindir)
        options = f"-c listen_addresses='' -k {socket_dir}"  # unix socket only, no TCP
        self._run("pg_ctl", "-w", "-t", WAIT, "-l", str(pgdata / "log"), "-o", options, "start")

    def release(self, *, last: bool) -> None:
        if last and _read_postmaster(self._pgdata) is not None:
            logger.info("stopping embedded PostgreSQL in %s", self._pgdata)
            self._run("pg_ctl", "-w", "-t", WAIT, "-m", "fast", "stop")

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
                cwd="/", timeout=2 * TIMEOUT, check=False,
            )  # fmt: skip
            output.seek(0)
            text = " | ".join(output.read().strip().splitlines()[-3:])
        if result.returncode != 0:
            log = tail(self._pgdata / "log")
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
        f"no embedded PostgreSQL: {NO_EXTRA}, Python <= 3.12) or put initdb/pg_ctl on PATH, "
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
            logger.info("adding the search permission to %s for user %s", parent, user)
            parent.chmod(mode | stat.S_IXOTH)


def _chown(path: Path, user: str) -> None:
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
