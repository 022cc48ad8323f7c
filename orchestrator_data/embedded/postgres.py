"""The embedded PostgreSQL: the server bundled in pgserver, or initdb/pg_ctl found on the machine.

:func:`choose_postgres` settles which server will run, and so its major version, before any
data directory is chosen; :func:`cluster_dir` gives each major its own cluster in the folder.
Either way this module runs ``initdb`` and ``pg_ctl`` itself (pgserver only provides the
binaries: its own start-up widens folders up to ``/`` and trusts every local connection).

Only the OS user who starts it can connect: no TCP listener; the unix socket in the cluster
folder (0700), or, when that path is too long for a socket, in a fresh ``mkdtemp`` folder of
``/tmp`` (0700, owned by the server's user); and peer authentication, the kernel naming the
connecting user, through ``pg_ident.conf``'s ``orchestrator`` map, which lets that user (and the
server's own) in as the database user ``postgres`` and nobody else. ``pg_hba.conf`` and
``pg_ident.conf`` are written at every start, so a cluster made with ``trust`` by an earlier
release is switched over the first time it starts; one already running is switched with a
reload when its socket is private, and refused, with how to stop it, when it is not.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

from orchestrator_data.embedded._common import (
    FOLDER_MODE,
    NO_EXTRA,
    PG_MODE_ENV,
    TIMEOUT,
    WAIT,
    PostgresHandle,
    logger,
    pid_alive,
    status,
    tail,
    write_atomic,
)
from orchestrator_data.errors import EmbeddedServerError

#: The cluster folder of the releases before one cluster per major; still used when it holds the
#: major of the server that runs.
LEGACY_CLUSTER = "pg"
#: The OS accounts an embedded PostgreSQL runs as when started by root (the server refuses to run
#: as root), in order of preference; an existing cluster keeps its owner. Earlier releases ran
#: pgserver's clusters as ``pgserver``.
SERVER_USERS = ("postgres", "pgserver")
#: Prefix of the private socket folders made in /tmp for clusters whose own path is too long.
SOCKET_PREFIX = "orchestrator-pg-"
SOCKET_PARENT = Path("/tmp")  # noqa: S108 - mkdtemp folders: 0700, names no one can take first
IDENT_MAP = "orchestrator"
_HEADER = (
    "# Written by orchestrator_data at each start of this embedded PostgreSQL: edits are lost.\n"
)
HBA = (
    _HEADER + "# Unix socket only (listen_addresses is empty), in a folder only its owner enters;\n"
    f"# only the OS users of pg_ident.conf's {IDENT_MAP} map may log in, as the roles it names.\n"
    f"local all all peer map={IDENT_MAP}\n"
    f"local replication all peer map={IDENT_MAP}\n"
)


@dataclass(frozen=True)
class PostgresServer:
    """The PostgreSQL that will run: how (``pgserver`` or ``binaries``), from where, which major."""

    kind: str
    bindir: Path
    major: int

    def open(self, pgdata: Path) -> PostgresHandle:
        """Start (or join) this server on the cluster ``pgdata``, creating the cluster if new."""
        _clear_dead_postmaster(pgdata)
        return _Cluster(pgdata, self)

    def run_as(self, pgdata: Path) -> str | None:
        """The OS user the server of ``pgdata`` runs as, when it is not this process's: None
        unless running as root (the cluster's owner, or the first of :data:`SERVER_USERS`)."""
        return _server_user(pgdata) if os.geteuid() == 0 else None


def choose_postgres() -> PostgresServer:
    """The server :envvar:`ORCHESTRATOR_EMBEDDED_PG` asks for: ``pgserver`` when installed
    (``auto``, the default) or is forced, else the machine's binaries; nothing starts yet."""
    mode = os.environ.get(PG_MODE_ENV, "").strip().lower() or "auto"
    if mode not in {"auto", "pgserver", "binaries"}:
        raise EmbeddedServerError(f"{PG_MODE_ENV} must be auto, pgserver or binaries, not {mode!r}")
    if mode != "binaries":
        # Its binaries only: importing pgserver would set up its runtime folder and lock.
        spec = importlib.util.find_spec("pgserver")
        bindir = Path(spec.origin).parent / "pginstall" / "bin" if spec and spec.origin else None
        if bindir is not None and (bindir / "postgres").is_file():
            return PostgresServer("pgserver", bindir, server_major(bindir))
        if mode == "pgserver":
            raise EmbeddedServerError(
                f"pgserver is not installed: {NO_EXTRA}, Python <= 3.12), or set DATABASE_URL"
            )
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
        _remove_socket_dir(info)


def _remove_socket_dir(info: _Postmaster) -> None:
    """Remove the private /tmp socket folder the server ``info`` describes used, if it had one."""
    folder = Path(info.socket_dir) if info.socket_dir else None
    if (
        folder is not None
        and folder.parent == SOCKET_PARENT
        and folder.name.startswith(SOCKET_PREFIX)
    ):
        shutil.rmtree(folder, ignore_errors=True)


class _Cluster:
    """A private cluster run with ``initdb`` and ``pg_ctl`` (pgserver's or the machine's)."""

    def __init__(self, pgdata: Path, server: PostgresServer) -> None:
        self._pgdata, self._bindir, self._major = pgdata, server.bindir, server.major
        self._user = server.run_as(pgdata)
        self._owner: tuple[int, int] | None = None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            self._owner = (entry.pw_uid, entry.pw_gid)
            if not (pgdata / "PG_VERSION").exists():
                os.chown(pgdata, *self._owner)
                pgdata.chmod(FOLDER_MODE)
            _check_reachable(self._user, pgdata, self._bindir)
        if postmaster_url(pgdata) is not None:
            self._check_running()
            _reusing(pgdata, server.major)
            return
        since = _starting(pgdata, server.major)
        if not (pgdata / "PG_VERSION").exists():
            logger.info("initialising embedded PostgreSQL in %s with %s", pgdata, self._bindir)
            # pg_hba.conf is replaced below; reject rather than initdb's default of trust
            # should anything start on initdb's own.
            args = ["--username=postgres", "--encoding=UTF8", "--auth-local=peer"]
            args += ["--auth-host=reject"]
            if server.kind == "binaries":  # pgserver's clusters take the environment's locale
                args.append("--no-locale")
            self._run("initdb", *args)
        self._write_authentication()
        socket_dir = self._socket_dir()
        logger.info("pg_ctl start of %s with %s", pgdata, self._bindir)
        options = "-c listen_addresses='' -c unix_socket_permissions=0700"  # no TCP; owner only
        options += f" -k {shlex.quote(str(socket_dir))}"
        try:
            self._run("pg_ctl", "-w", "-t", WAIT, "-l", str(pgdata / "log"), "-o", options, "start")
        except EmbeddedServerError:
            if socket_dir != pgdata:
                shutil.rmtree(socket_dir, ignore_errors=True)
            raise
        _ready(server.major, since)

    def release(self, *, last: bool) -> None:
        info = _read_postmaster(self._pgdata)
        if last and info is not None:
            logger.info("stopping embedded PostgreSQL in %s", self._pgdata)
            self._run("pg_ctl", "-w", "-t", WAIT, "-m", "fast", "stop")
            _remove_socket_dir(info)

    def _check_running(self) -> None:
        """A server already running on the cluster (another process's, possibly an earlier
        release's): its socket must be private; its authentication is switched to ours."""
        info = _read_postmaster(self._pgdata)
        folder = Path(info.socket_dir) if info is not None and info.socket_dir else None
        if folder is None or not self._private(folder):
            where = f"its socket in {folder}" if folder is not None else "a TCP listener"
            stop = f"{self._bindir / 'pg_ctl'} -D {self._pgdata} stop"
            if self._user is not None:
                stop = f"runuser -u {self._user} -- {stop}"
            raise EmbeddedServerError(
                f"embedded PostgreSQL in {self._pgdata} runs with {where}, which other local users "
                f"can reach (an earlier release started it): end the programs using it, or run "
                f"'{stop}', and start again"
            )
        if self._authentication() != self._read_authentication():
            logger.warning(
                "embedded PostgreSQL in %s runs with another release's authentication (trust, "
                "before this one); switching it to peer authentication", self._pgdata,
            )  # fmt: skip
            self._write_authentication()
            self._run("pg_ctl", "reload")

    def _private(self, folder: Path) -> bool:
        """Whether ``folder`` is a real folder that only this process's user or the server's
        can enter."""
        try:
            info = folder.lstat()
        except OSError:
            return False
        owners = {os.geteuid()} | ({self._owner[0]} if self._owner is not None else set())
        return (
            stat.S_ISDIR(info.st_mode)
            and not stat.S_IMODE(info.st_mode) & 0o077
            and info.st_uid in owners
        )

    def _authentication(self) -> tuple[str, str]:
        """What ``pg_hba.conf`` and ``pg_ident.conf`` hold: peer authentication through the
        socket for this process's OS user and the server's, as any role (PostgreSQL >= 16; 15
        and before can map a user to named roles only, so to ``postgres``)."""
        users = [_user_name(os.geteuid())]
        if self._user is not None and self._user not in users:
            users.append(self._user)
        roles = "all" if self._major >= 16 else "postgres"
        ident = _HEADER + "".join(f"{IDENT_MAP} {user} {roles}\n" for user in users)
        return HBA, ident

    def _read_authentication(self) -> tuple[str, str] | None:
        try:
            hba = (self._pgdata / "pg_hba.conf").read_text()
            return hba, (self._pgdata / "pg_ident.conf").read_text()
        except OSError:
            return None

    def _write_authentication(self) -> None:
        hba, ident = self._authentication()
        write_atomic(self._pgdata / "pg_hba.conf", hba, owner=self._owner)
        write_atomic(self._pgdata / "pg_ident.conf", ident, owner=self._owner)

    def _socket_dir(self) -> Path:
        # A unix socket path must fit in ~104 bytes; long folders get a private one in /tmp,
        # made afresh (mkdtemp: 0700, a name no one can take first) at each start.
        if len(str(self._pgdata / ".s.PGSQL.65535")) < 100:
            return self._pgdata
        path = Path(tempfile.mkdtemp(prefix=SOCKET_PREFIX, dir=SOCKET_PARENT))
        if self._owner is not None:
            os.chown(path, *self._owner)
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


def _server_user(pgdata: Path) -> str:
    """The unprivileged account to run PostgreSQL as: the cluster's owner, else the first of
    :data:`SERVER_USERS` that exists."""
    try:
        owner = pgdata.stat().st_uid
    except FileNotFoundError:
        owner = 0
    if owner != 0 and (pgdata / "PG_VERSION").exists():
        return _user_name(owner)
    for name in SERVER_USERS:
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            continue
    raise EmbeddedServerError(
        "embedded PostgreSQL cannot run as root and there is no 'postgres' user; "
        "create one or set DATABASE_URL"
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise EmbeddedServerError(
            f"the OS user {uid} has no name, which PostgreSQL's peer authentication needs; "
            "set DATABASE_URL"
        ) from None


_FIRST_CLOSED = 'for d do [ -x "$d" ] || { printf %s "$d"; exit 1; }; done'


def _check_reachable(user: str, *paths: Path) -> None:
    """Raise, naming the folder, unless ``user`` can enter each of ``paths`` (and so every
    folder above them): no folder's permissions are changed to let it through."""
    folders: list[Path] = []
    for path in paths:
        folders += [f for f in (*reversed(path.parents), path) if f not in folders]
    command = ["runuser", "-u", user, "--", "/bin/sh", "-c", _FIRST_CLOSED, "sh"]
    result = subprocess.run(  # noqa: S603 - our own argument list, the folders as arguments
        [*command, *map(str, folders)], stdin=subprocess.DEVNULL, capture_output=True,
        text=True, cwd="/", timeout=TIMEOUT, check=False,
    )  # fmt: skip
    if result.returncode == 0:
        return
    closed = result.stdout or f"one of {', '.join(map(str, folders))} ({result.stderr.strip()})"
    raise EmbeddedServerError(
        f"embedded PostgreSQL runs as the user {user}, who cannot enter {closed}: let it pass "
        f"(setfacl -m u:{user}:x {closed}, for instance), choose a data folder it can reach, "
        "or set DATABASE_URL"
    )
