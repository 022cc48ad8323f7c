"""The embedded PostgreSQL: pgserver, or initdb/pg_ctl binaries found on the machine.

:func:`choose_postgres` settles which server will run, and so its major version, before any
data directory is chosen; :func:`cluster_dir` gives each major its own cluster in the folder.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    status,
    tail,
)
from orchestrator_data.errors import EmbeddedServerError

#: The cluster folder of the releases before one cluster per major; still used when it holds the
#: major of the server that runs.
LEGACY_CLUSTER = "pg"


@dataclass(frozen=True)
class PostgresServer:
    """The PostgreSQL that will run: how (``pgserver`` or ``binaries``), from where, which major."""

    kind: str
    bindir: Path
    major: int
    _pgserver: Any = field(default=None, repr=False, compare=False)

    def open(self, pgdata: Path) -> PostgresHandle:
        """Start (or join) this server on the cluster ``pgdata``, creating the cluster if new."""
        _clear_dead_postmaster(pgdata)
        if self._pgserver is not None:
            return _PgserverPostgres(self._pgserver, pgdata, self.major)
        return _BinariesPostgres(pgdata, self.bindir, self.major)


def choose_postgres() -> PostgresServer:
    """The server :envvar:`ORCHESTRATOR_EMBEDDED_PG` asks for: ``pgserver`` when it imports
    (``auto``, the default) or is forced, else the machine's binaries; nothing starts yet."""
    mode = os.environ.get(PG_MODE_ENV, "").strip().lower() or "auto"
    if mode not in {"auto", "pgserver", "binaries"}:
        raise EmbeddedServerError(f"{PG_MODE_ENV} must be auto, pgserver or binaries, not {mode!r}")
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
            bindir = Path(pgserver._commands.POSTGRES_BIN_PATH)
            return PostgresServer("pgserver", bindir, server_major(bindir), pgserver)
    bindir = _find_pg_bindir()
    return PostgresServer("binaries", bindir, server_major(bindir))


_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)")


@functools.cache
def server_major(bindir: Path) -> int:
    """The major version of ``bindir/postgres``, from its ``--version`` (16 for 16.2)."""
    postgres = bindir / "postgres"
    try:
        result = subprocess.run(  # noqa: S603 - our own argument list, no shell
            [str(postgres), "--version"], stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedServerError(f"cannot run {postgres} --version: {exc}") from exc
    match = _VERSION.search(result.stdout)
    if result.returncode != 0 or match is None:
        said = (result.stdout or result.stderr).strip()
        raise EmbeddedServerError(f"{postgres} --version gave no version: {said!r}")
    return int(match.group(1))


def cluster_dir(root: Path, major: int) -> Path:
    """The cluster of PostgreSQL ``major`` under the data folder ``root``: ``pg<major>/``, or the
    legacy ``pg/`` when it holds that major and ``pg<major>/`` holds no cluster yet."""
    current, legacy = root / f"pg{major}", root / LEGACY_CLUSTER
    if (current / "PG_VERSION").exists():
        return current
    legacy_major = _cluster_major(legacy)
    if legacy_major == major:
        return legacy
    if legacy_major is not None:
        logger.info(
            "%s holds a PostgreSQL %d cluster; PostgreSQL %d gets its own in %s",
            legacy, legacy_major, major, current,
        )  # fmt: skip
    return current


def _cluster_major(pgdata: Path) -> int | None:
    try:
        version = (pgdata / "PG_VERSION").read_text().strip()  # "16", or "9.6" before 10
    except OSError:
        return None
    head = version.split(".")[0]
    return int(head) if head.isdigit() else None


def _starting(pgdata: Path, major: int) -> float:
    new = "" if (pgdata / "PG_VERSION").exists() else " (new cluster)"
    status.info("starting embedded PostgreSQL %d in %s%s ...", major, pgdata, new)
    return time.monotonic()


def _ready(major: int, since: float) -> None:
    status.info("embedded PostgreSQL %d ready (%.1f s)", major, time.monotonic() - since)


def _reusing(pgdata: Path, major: int) -> None:
    status.info("reusing embedded PostgreSQL %d in %s", major, pgdata)


_pgserver_debug = logging.getLogger("orchestrator_data.embedded.pgserver")


class _PgserverAtDebug(logging.Filter):
    """pgserver logs each command line and its whole output at INFO (logger ``pgserver``): drop
    those records and pass them on at DEBUG as ``orchestrator_data.embedded.pgserver``; its
    warnings and errors go through unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if _pgserver_debug.isEnabledFor(logging.DEBUG):
            fields = {"name": _pgserver_debug.name, "levelno": logging.DEBUG, "levelname": "DEBUG"}
            _pgserver_debug.handle(logging.makeLogRecord({**record.__dict__, **fields}))
        return False


@contextmanager
def _pgserver_at_debug() -> Iterator[None]:
    # Only around our own calls into pgserver: other users of pgserver in the process keep theirs.
    pgserver_logger, quiet = logging.getLogger("pgserver"), _PgserverAtDebug()
    pgserver_logger.addFilter(quiet)
    try:
        yield
    finally:
        pgserver_logger.removeFilter(quiet)


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


class _PgserverPostgres:
    """PostgreSQL run by ``pgserver``, which refcounts its own handles in the pgdata."""

    def __init__(self, pgserver: Any, pgdata: Path, major: int) -> None:
        self._cls = pgserver.postgres_server.PostgresServer
        self._pgdata = pgdata
        self._prune_handles()
        since: float | None = None
        if postmaster_url(pgdata) is not None:
            _reusing(pgdata, major)
        else:
            since = _starting(pgdata, major)
        try:
            with _pgserver_at_debug():
                self._server = pgserver.get_server(pgdata, cleanup_mode="stop")
        except (subprocess.SubprocessError, OSError, RuntimeError, AssertionError) as exc:
            # pgserver registered the half-made server; a later try must not be handed it back.
            broken = self._cls._instances.pop(pgdata, None)
            if broken is not None:
                atexit.unregister(broken._cleanup)
            raise EmbeddedServerError(
                f"pgserver could not start PostgreSQL {major} in {pgdata} ({type(exc).__name__}); "
                f"last lines of {pgdata / 'log'}: {tail(pgdata / 'log')}"
            ) from exc
        # Our handle owns the lifecycle: release() runs pgserver's cleanup, not its atexit hook.
        atexit.unregister(self._server._cleanup)
        if since is not None:
            _ready(major, since)

    def _prune_handles(self) -> None:
        # pgserver never forgets a pid, so a killed process would keep its server up forever.
        with self._cls._lock:
            prune_pid_list(self._pgdata / ".handle_pids.json")

    def release(self, *, last: bool) -> None:
        self._prune_handles()
        if last:
            logger.info("stopping embedded PostgreSQL in %s", self._pgdata)
        with _pgserver_at_debug():
            self._server.cleanup()  # with cleanup_mode="stop": pg_ctl stop when no pid is left
        # get_server() hands back a cached instance without re-registering our pid; drop it.
        self._cls._instances.pop(self._pgdata, None)


class _BinariesPostgres:
    """A private cluster run with the ``initdb`` and ``pg_ctl`` installed on the machine."""

    def __init__(self, pgdata: Path, bindir: Path, major: int) -> None:
        self._pgdata = pgdata
        self._bindir = bindir
        self._user = _pg_system_user(pgdata) if os.geteuid() == 0 else None
        if self._user is not None:
            _make_owned_by(pgdata, self._user)
        if postmaster_url(pgdata) is not None:
            _reusing(pgdata, major)
            return
        since = _starting(pgdata, major)
        if not (pgdata / "PG_VERSION").exists():
            logger.info("initialising embedded PostgreSQL in %s with %s", pgdata, bindir)
            self._run(
                "initdb", "--auth=trust", "--username=postgres", "--encoding=UTF8", "--no-locale"
            )
        socket_dir = shlex.quote(str(self._socket_dir()))
        logger.info("pg_ctl start of %s with %s", pgdata, bindir)
        options = f"-c listen_addresses='' -k {socket_dir}"  # unix socket only, no TCP
        self._run("pg_ctl", "-w", "-t", WAIT, "-l", str(pgdata / "log"), "-o", options, "start")
        _ready(major, since)

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
