"""Helpers shared by the embedded PostgreSQL and Redis: timeouts, pid files, messages."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Protocol

PG_MODE_ENV = "ORCHESTRATOR_EMBEDDED_PG"
TIMEOUT = 60.0  # seconds for one server to start or stop, and to wait for the folder lock


WAIT = str(int(TIMEOUT))


NO_EXTRA = "install the 'embedded' extra (pip install 'orchestrator-data[embedded]'"


logger = logging.getLogger("orchestrator_data.embedded")
#: One line when a server starts, one when it is ready (or one when it is reused): the CLI shows
#: these on stderr at every verbosity; a library caller sees them only if it shows INFO.
status = logging.getLogger("orchestrator_data.embedded.status")


class PostgresHandle(Protocol):
    def release(self, *, last: bool) -> None: ...


def pid_alive(pid: int) -> bool:
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


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# --- Redis -------------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def prune_pid_list(path: Path, *, drop: int = 0) -> list[int]:
    try:
        old = [int(pid) for pid in json.loads(path.read_text())]
    except FileNotFoundError:
        return []
    except (ValueError, TypeError):
        logger.warning("ignoring unreadable handle list %s", path)
        old = []
    pids = [pid for pid in old if pid != drop and pid_alive(pid)]
    if pids != old:
        write_atomic(path, json.dumps(pids))
    return pids


def tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- PostgreSQL --------------------------------------------------------------------------------
