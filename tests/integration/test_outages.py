"""Database outages and the CLI's failures, as a user meets them.

A PostgreSQL of the test's own (on a free port, never the shared one) is
killed with SIGKILL in the middle of a transaction and started again: every
call in between gets :class:`DatabaseUnavailableError`, and the same
DataLayer works again once the server is back. The CLI answers every
expected failure with one line and a non-zero exit, a traceback only with -v.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy import text

from fixtures.own_servers import free_port
from fixtures.pytest_plugin import Servers
from orchestrator_data import DatabaseUnavailableError, DataLayer, Settings
from orchestrator_data.errors import MigrationError


def _pg_bindir() -> Path | None:
    candidates = [Path(p).parent for p in [shutil.which("postgres") or ""] if p]
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for bindir in candidates:
        if (bindir / "postgres").is_file() and (bindir / "initdb").is_file():
            return bindir
    return None


class OwnPostgres:
    """A PostgreSQL cluster of the test's own: :meth:`start` runs the
    postmaster as our child (as the ``postgres`` user when we are root, since
    PostgreSQL refuses to run as root), :meth:`kill` SIGKILLs it and its
    backends by process id, as a crash would."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.dir = Path(tempfile.mkdtemp(prefix="od-outage-"))
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.pgdata = self.dir / "data"
        self.process: subprocess.Popen[bytes] | None = None
        initdb = [str(bindir / "initdb"), "-D", str(self.pgdata), "--auth=trust", "-U", "postgres"]
        subprocess.run(
            [*initdb, "--no-sync", "--no-locale", "--encoding=UTF8"],
            user=self.user,
            check=True,
            capture_output=True,
            timeout=120,
        )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        with open(self.dir / "log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    *(str(self.bindir / "postgres"), "-D", str(self.pgdata), "-p", str(self.port)),
                    *("-k", str(self.dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"),
                    *("-c", "max_connections=20", "-c", "shared_buffers=16MB"),
                ],
                user=self.user,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg2.connect(self.url, connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the postmaster and each of its children, and wait for them."""
        if self.process is None:
            return
        children = self._children(self.process.pid)
        self.process.send_signal(signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):  # gone already
                os.kill(pid, signal.SIGKILL)
        self.process.wait(30)
        self.process = None
        deadline = time.monotonic() + 30
        while any(self._alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.02)

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _children(parent: int) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(stat.parent.name))
        return found

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"  # a zombie holds no memory nor port


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL binaries (initdb, postgres) on this machine")
    server = OwnPostgres(bindir)
    try:
        server.start()
        yield server
    finally:
        server.remove()


def test_a_server_killed_mid_transaction_and_restarted(
    own_postgres: OwnPostgres, od_servers: Servers
) -> None:
    settings = Settings(
        database_url=own_postgres.url,
        redis_url=od_servers.redis_url,
        key_prefix=f"od_test_{uuid.uuid4().hex[:12]}:",
        pool_min=2,
        pool_max=4,
        connect_timeout=2,
        max_retries=3,
    )
    with DataLayer(settings) as dl:
        dl.migrate("head")
        with dl.unit_of_work() as uow:
            kept = uow.agents.create(name="kept", role="r")
            uow.commit()

        # Killed while a transaction is open: its next statement, and its
        # commit, say the connection is lost; nothing raw escapes.
        lost = "lost the connection"
        with pytest.raises(DatabaseUnavailableError, match=lost), dl.unit_of_work() as uow:
            uow.agents.create(name="doomed", role="r")
            own_postgres.kill()
            uow.agents.create(name="after", role="r")
        own_postgres.start()
        with pytest.raises(DatabaseUnavailableError, match=lost), dl.unit_of_work() as uow:
            uow.agents.create(name="doomed", role="r")
            own_postgres.kill()
            uow.commit()

        # While it is down, every path says so.
        for call in (
            lambda: dl.unit_of_work().__enter__(),
            lambda: dl.run_in_transaction(lambda uow: uow.agents.get(kept.id)),
            lambda: dl.migrate("head"),
            lambda: dl.downgrade("base"),
            dl.current_revision,
        ):
            with pytest.raises(DatabaseUnavailableError, match="cannot connect"):
                call()

        # Back on the same port: the same DataLayer works at once.
        own_postgres.start()
        with dl.unit_of_work() as uow:
            assert uow.agents.get_or_raise(kept.id).name == "kept"
            assert uow.agents.get_by_name("doomed", cached=False) is None
            uow.agents.create(name="later", role="r")
            uow.commit()
        assert dl.current_revision() is not None
        # Every pooled connection was replaced, not just the one that failed.
        with dl.unit_of_work() as a, dl.unit_of_work() as b:
            a.session.execute(text("SELECT 1"))
            b.session.execute(text("SELECT 1"))

        # Restarted between two units of work, unnoticed: a connection used
        # less than pool_ping_after ago is not pinged, so at most the first
        # unit of work finds it dead (and the pool renews them all).
        own_postgres.kill()
        own_postgres.start()
        with contextlib.suppress(DatabaseUnavailableError), dl.unit_of_work() as uow:
            uow.session.execute(text("SELECT 1"))
        with dl.unit_of_work() as uow, dl.unit_of_work() as other:
            uow.session.execute(text("SELECT 1"))
            other.session.execute(text("SELECT 1"))


def test_migration_refusals_are_package_errors(data_layer: DataLayer) -> None:
    with pytest.raises(MigrationError, match="'999'"):
        data_layer.migrate("999")
    with pytest.raises(MigrationError, match="'999'"):
        data_layer.downgrade("999")
    assert data_layer.current_revision() is not None  # nothing changed


# -- the CLI -------------------------------------------------------------------


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator_data", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line(out: subprocess.CompletedProcess[str], said: str, code: int = 1) -> None:
    assert out.returncode == code, out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: ") and said in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_cli_unreachable_server_is_one_line(od_servers: Servers) -> None:
    env = {
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
        "REDIS_URL": od_servers.redis_url,
    }
    for args in (("migrate", "up"), ("audit", "recent"), ("migrate", "status")):
        assert_one_line(run_cli(env, *args), "cannot connect to PostgreSQL")
    verbose = run_cli(env, "-v", "migrate", "up")
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr
    assert verbose.stderr.rstrip().splitlines()[-1].startswith("error: cannot connect")


def test_cli_bad_revisions_and_unmigrated_database(
    empty_database: str, od_servers: Servers
) -> None:
    env = {"DATABASE_URL": empty_database, "REDIS_URL": od_servers.redis_url}
    assert_one_line(run_cli(env, "migrate", "down"), "nothing to roll back")
    assert_one_line(run_cli(env, "migrate", "up", "999"), "'999'")
    assert_one_line(
        run_cli(env, "audit", "show", str(uuid.uuid4())), "run `orchestrator-data migrate up`"
    )
    assert_one_line(run_cli(env, "migrate", "up", "head", "extra"), "unexpected extra", code=2)


def test_cli_bad_arguments_are_one_line() -> None:
    # Checked before anything connects: no servers in the environment.
    env = {"DATABASE_URL": "", "REDIS_URL": "", "PATH": "/usr/bin:/bin"}
    assert_one_line(run_cli(env, "audit", "recent", "--limit", "0"), "--limit", code=2)
    assert_one_line(run_cli(env, "nosuchcommand"), "No such command", code=2)
