"""Helpers shared by the embedded PostgreSQL and Redis: timeouts, pid files, private files,
messages."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Protocol

PG_MODE_ENV = "ORCHESTRATOR_EMBEDDED_PG"
TIMEOUT = 60.0  # seconds for one server to start or stop, and to wait for the folder lock


WAIT = str(int(TIMEOUT))


NO_EXTRA = "install the 'embedded' extra (pip install 'orchestrator-data[embedded]'"

#: Every file the embedded servers keep is readable by its owner only, every folder they create
#: enterable by its owner only (the data folder itself: see ``lifecycle``).
FILE_MODE, FOLDER_MODE = 0o600, 0o700


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


def write_atomic(path: Path, text: str, *, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` by a file holding ``text``, mode 0600 (and owned by ``owner``, a uid and
    gid, when given) from the start: readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    with open(os.open(tmp, flags, FILE_MODE), "w") as handle:
        os.fchmod(handle.fileno(), FILE_MODE)  # a leftover of a killed run may have another mode
        if owner is not None:
            os.fchown(handle.fileno(), *owner)
        handle.write(text)
    tmp.replace(path)


def restrict(path: Path, mode: int) -> None:
    """Take from ``path``, an entry the embedded servers made (possibly an earlier release, with
    wider modes), every permission bit beyond ``mode``; nothing when it is missing or a link."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    current = stat.S_IMODE(info.st_mode)
    if not stat.S_ISLNK(info.st_mode) and current & ~mode:
        logger.info("restricting %s to mode %o", path, current & mode)
        path.chmod(current & mode)


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
