"""Where the servers are, for the CLI: the environment's, or embedded ones."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace

from orchestrator_data.config import Settings


@contextmanager
def resolve_settings(
    environ: Mapping[str, str] | None = None, data_dir: str | None = None
) -> Iterator[Settings]:
    """Settings from the environment; when ``DATABASE_URL`` or ``REDIS_URL``
    is missing, start the embedded servers for the missing ones (and release
    them on exit)."""
    env = os.environ if environ is None else environ
    settings = Settings.from_env(env)
    if settings.database_url and settings.redis_url:
        yield settings
        return
    from orchestrator_data.embedded import start_embedded

    servers = start_embedded(data_dir or settings.data_dir)
    try:
        yield replace(
            settings,
            database_url=settings.database_url or servers.database_url,
            redis_url=settings.redis_url or servers.redis_url,
        )
    finally:
        servers.stop()
