"""Starting and stopping the shared embedded servers: the folder lock, the
handles each process holds, and the last one out stopping both servers."""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import redis

from orchestrator_data.embedded._common import (
    TIMEOUT,
    PostgresHandle,
    logger,
    prune_pid_list,
    write_atomic,
)
from orchestrator_data.embedded.postgres import open_postgres, postmaster_url
from orchestrator_data.embedded.redis_server import running_redis_port, start_redis, stop_redis
from orchestrator_data.errors import EmbeddedServerError

DEFAULT_DATA_DIR = Path(".orchestrator_data")


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
            port = running_redis_port(root / "redis") or start_redis(root / "redis")
            handle = _acquire_postgres(root)
        except BaseException:
            if root not in _handles and not _update_handles(root, remove=os.getpid()):
                stop_redis(root / "redis")
            raise
        token = next(_tokens)
        handle.tokens.add(token)
        database_url = postmaster_url(root / "pg")
    if database_url is None:  # pragma: no cover - the backends only return once it is ready
        raise EmbeddedServerError(f"embedded PostgreSQL in {root / 'pg'} is not ready")
    return EmbeddedServers(database_url, f"redis://127.0.0.1:{port}/0", root, token)


# --- handles: per process in memory, across processes in .handles.json ----------------------


@dataclass
class _ProcessHandle:
    postgres: PostgresHandle
    pid: int  # a forked child inherits this dict but owns none of it
    tokens: set[int] = field(default_factory=set)


_handles: dict[Path, _ProcessHandle] = {}
_tokens = count(1)


def _acquire_postgres(root: Path) -> _ProcessHandle:
    handle = _handles.get(root)
    if handle is not None and handle.pid == os.getpid():
        if postmaster_url(root / "pg") is None:
            logger.warning("embedded PostgreSQL in %s went away; starting it again", root)
            handle.postgres.release(last=False)
            handle.postgres = open_postgres(root / "pg")
        return handle
    handle = _ProcessHandle(open_postgres(root / "pg"), os.getpid())
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
    with open(root / ".lock", "a") as lock:
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


def _update_handles(root: Path, *, add: int = 0, remove: int = 0) -> list[int]:
    """Prune dead pids from the handle list, apply the change, return the pids left."""
    path = root / ".handles.json"
    pids = prune_pid_list(path, drop=remove)
    if add and add not in pids:
        pids.append(add)
        write_atomic(path, json.dumps(pids))
    return pids
