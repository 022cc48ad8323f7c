"""Starting and stopping the shared embedded servers: the folder lock, the
handles each process holds, and the last one out stopping both servers."""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import pwd
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import redis

from orchestrator_data.config import redact_url
from orchestrator_data.embedded._common import (
    FILE_MODE,
    FOLDER_MODE,
    TIMEOUT,
    PostgresHandle,
    logger,
    prune_pid_list,
    restrict,
    status,
    write_atomic,
)
from orchestrator_data.embedded.postgres import (
    PostgresServer,
    choose_postgres,
    cluster_dir,
    postmaster_url,
)
from orchestrator_data.embedded.redis_server import (
    redis_url,
    running_redis_port,
    start_redis,
    stop_redis,
)
from orchestrator_data.errors import EmbeddedServerError

DEFAULT_DATA_DIR = Path(".orchestrator_data")


@dataclass(frozen=True)
class EmbeddedServers:
    """Where the embedded servers listen, and the caller's handle on them.

    Returned by :func:`start_embedded`. Call :meth:`stop` once when done; handles still held
    are released when the interpreter exits. ``postgres_dir`` is the cluster of the PostgreSQL
    major that runs (``postgres_major``), under ``data_dir``. ``redis_url`` carries the Redis
    password: the repr shows it redacted, and so should anything that prints it.
    """

    database_url: str
    redis_url: str
    data_dir: Path
    postgres_dir: Path
    postgres_major: int
    _token: int = field(default=0, repr=False, compare=False)

    def __repr__(self) -> str:
        return (
            f"EmbeddedServers(database_url={redact_url(self.database_url)!r}, "
            f"redis_url={redact_url(self.redis_url)!r}, data_dir={self.data_dir!r}, "
            f"postgres_dir={self.postgres_dir!r}, postgres_major={self.postgres_major!r})"
        )

    def stop(self) -> None:
        """Release this handle; the last handle on a cluster stops that PostgreSQL, the last
        handle on the folder stops Redis.

        Stopping is clean (``pg_ctl stop``, Redis ``SHUTDOWN``). Calling it twice is harmless.
        """
        handle = _handles.get(self.data_dir)
        if handle is not None and self._token in handle.tokens:
            with _locked(self.data_dir):
                _release(self.data_dir, self._token)


def start_embedded(data_dir: str | Path | None = None) -> EmbeddedServers:
    """Start PostgreSQL and Redis under ``data_dir`` (default :data:`DEFAULT_DATA_DIR`).

    Servers already running for that folder, started by this or another process, are reused;
    data survives between runs. Each PostgreSQL major gets its own cluster in the folder
    (``pg16/``, ``pg15/``...), so interpreters that bring different servers can share it; Redis
    is one for the folder. Raises :class:`EmbeddedServerError` when a server cannot start.

    Progress goes to the logger ``orchestrator_data.embedded.status`` at INFO (a line when a
    server starts, one when it is ready, one when it is reused); nothing is printed unless the
    application shows those records, as the CLI does on stderr.
    """
    root = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR).expanduser().resolve()
    server = choose_postgres()  # the major decides the cluster; a bad setting fails here
    _make_data_folder(root, server)
    with _locked(root):
        _restrict_ours(root)
        pgdata = cluster_dir(root, server.major)
        pgdata.mkdir(mode=FOLDER_MODE, exist_ok=True)
        held = _held(root)
        _claim(_folder_handles(root))
        try:
            port = running_redis_port(root / "redis") or start_redis(root / "redis")
            handle = _acquire_postgres(root, server, pgdata)
        except BaseException:
            if held is None:  # the process had nothing here: undo its claim on the folder
                mine = _held(root)
                if mine is not None and not mine.tokens:
                    del _handles[root]
                if not _unclaim(_folder_handles(root)):
                    stop_redis(root / "redis")
            raise
        token = next(_tokens)
        handle.tokens[token] = pgdata
        database_url = postmaster_url(pgdata)
        url = redis_url(root / "redis", port)
    if database_url is None:  # pragma: no cover - the backends only return once it is ready
        raise EmbeddedServerError(f"embedded PostgreSQL in {pgdata} is not ready")
    return EmbeddedServers(database_url, url, root, pgdata, server.major, token)


# --- the folder: private to the user who runs the servers --------------------------------------


def _make_data_folder(root: Path, server: PostgresServer) -> None:
    """Create ``root`` when missing: 0700, or, when running as root (PostgreSQL then runs as
    another user, who must pass through to its cluster), 0710 with the server user's group.
    A folder that exists keeps its mode (everything the servers keep in it is private).
    Missing folders above it are made as ``mkdir -p`` makes them."""
    if root.is_dir():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    user = server.run_as(root / f"pg{server.major}")  # a new folder has no cluster yet
    if user is None:
        root.mkdir(mode=FOLDER_MODE, exist_ok=True)
        return
    # Made aside and renamed into place, so that no other process starting at the same time
    # sees the folder before its group and mode are set.
    made = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        os.chown(made, -1, pwd.getpwnam(user).pw_gid)
        made.chmod(0o710)
        made.rename(root)  # an empty folder made meanwhile is replaced, a used one is not
    except OSError:
        if not root.is_dir():
            raise
    finally:
        if made.is_dir():
            made.rmdir()


def _restrict_ours(root: Path) -> None:
    """Files and folders of earlier releases were made world-readable: restrict them."""
    for path in (root / ".lock", *root.glob(".handles*.json")):
        restrict(path, FILE_MODE)
    redis_dir = root / "redis"
    redis_dir.mkdir(mode=FOLDER_MODE, exist_ok=True)
    restrict(redis_dir, FOLDER_MODE)
    for path in redis_dir.iterdir():
        restrict(path, FOLDER_MODE if path.is_dir() else FILE_MODE)


# --- handles: per process in memory, across processes in .handles*.json ---------------------


@dataclass
class _ProcessHandle:
    pid: int  # a forked child inherits this dict but owns none of it
    clusters: dict[Path, PostgresHandle] = field(default_factory=dict)  # by cluster folder
    tokens: dict[int, Path] = field(default_factory=dict)  # token -> its cluster folder


_handles: dict[Path, _ProcessHandle] = {}
_tokens = count(1)


def _held(root: Path) -> _ProcessHandle | None:
    """This process's handle on the folder ``root``, if it holds one."""
    handle = _handles.get(root)
    return handle if handle is not None and handle.pid == os.getpid() else None


def _acquire_postgres(root: Path, server: PostgresServer, pgdata: Path) -> _ProcessHandle:
    handle = _held(root)
    if handle is None:
        handle = _handles[root] = _ProcessHandle(os.getpid())
        # One exit hook serves every folder; unregistering first keeps it to one.
        atexit.unregister(_release_all)
        atexit.register(_release_all)
    postgres = handle.clusters.get(pgdata)
    if postgres is not None:
        if postmaster_url(pgdata) is not None:
            status.info("reusing embedded PostgreSQL %d in %s", server.major, pgdata)
            return handle
        logger.warning("embedded PostgreSQL in %s went away; starting it again", pgdata)
        del handle.clusters[pgdata]
        postgres.release(last=False)
    _claim(_cluster_handles(root, pgdata))
    try:
        handle.clusters[pgdata] = server.open(pgdata)
    except BaseException:
        _unclaim(_cluster_handles(root, pgdata))
        raise
    return handle


def _release(root: Path, token: int) -> None:
    handle = _held(root)
    if handle is None or token not in handle.tokens:
        return
    pgdata = handle.tokens.pop(token)
    try:
        postgres = handle.clusters.get(pgdata)
        if postgres is not None and pgdata not in handle.tokens.values():
            del handle.clusters[pgdata]
            postgres.release(last=not _unclaim(_cluster_handles(root, pgdata)))
    finally:
        if not handle.tokens:
            del _handles[root]
            if not _unclaim(_folder_handles(root)):
                stop_redis(root / "redis")


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
            logger.warning("could not release the embedded servers in %s", root, exc_info=True)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    # flock belongs to the open file description, so threads of one process exclude each other
    # too; a process that dies releases it with its descriptors.
    with open(os.open(root / ".lock", os.O_RDWR | os.O_CREAT, FILE_MODE), "a") as lock:
        deadline = time.monotonic() + 2 * TIMEOUT
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


def _folder_handles(root: Path) -> Path:
    """The pids holding a handle on the folder: Redis stops when none is left."""
    return root / ".handles.json"


def _cluster_handles(root: Path, pgdata: Path) -> Path:
    """The pids holding the cluster ``pgdata``: that PostgreSQL stops when none is left."""
    return root / f".handles.{pgdata.name}.json"


def _claim(pid_list: Path) -> None:
    """Add this process to ``pid_list`` (pruning dead pids)."""
    pids = prune_pid_list(pid_list)
    if os.getpid() not in pids:
        write_atomic(pid_list, json.dumps([*pids, os.getpid()]))


def _unclaim(pid_list: Path) -> list[int]:
    """Remove this process from ``pid_list`` (pruning dead pids); return the pids left."""
    return prune_pid_list(pid_list, drop=os.getpid())
