"""L2 operations of the repositories' read paths, beyond the dogpile API:
epoch-checked row reads, generation-stamped values, and fenced fills.

Row values are stored as ``{epoch}|{json}``; a value whose epoch is not the
entity's current one (``cache:epoch:{entity}``) is void, which lets one
counter bump drop every cached row of an entity without a SCAN.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from dogpile.cache.api import NO_VALUE
from redis import Redis
from redis.exceptions import NoScriptError, ResponseError

from orchestrator_data.cache import scripts, serialization
from orchestrator_data.cache.breaker import CircuitBreaker
from orchestrator_data.cache.filler import Filler
from orchestrator_data.cache.keys import Keys
from orchestrator_data.cache.query_codecs import QueryCodec
from orchestrator_data.cache.serialization import Row, RowCodec
from orchestrator_data.cache.stats import CacheStats

log = logging.getLogger("orchestrator_data.cache")


class L2:
    """Reads and fills of one cache's Redis."""

    def __init__(
        self,
        *,
        client: Redis | None,
        breaker: CircuitBreaker,
        keys: Keys,
        stats: CacheStats,
        filler: Filler,
        row_ttl: dict[str, float],
        counter_ttl_ms: int,
    ) -> None:
        self.client = client
        self.breaker = breaker
        self.keys = keys
        self.stats = stats
        self.filler = filler
        self._row_ttl = row_ttl
        self._counter_ttl_ms = counter_ttl_ms
        # EVALSHA once Redis knows the fill script: the body is not sent,
        # nor hashed by Redis, on every fill.
        self._fill_sha: str | None = None

    def read_row(self, codec: RowCodec[Any], key: str) -> Row | None:
        """The row at ``key`` if it carries the entity's current epoch, else
        None (one round trip: the value and the epoch in one MGET)."""
        stats = self.stats
        client = self.client
        assert client is not None
        epoch_key = self.keys.epoch(codec.entity)
        found = self.breaker.call(lambda: client.mget(key, epoch_key), None)
        if not found or found[0] is None or found[1] is None:
            stats.l2_misses += 1
            return None
        value, epoch = cast("tuple[bytes, bytes]", found)
        sep = value.find(b"|")
        if sep < 0 or value[:sep] != epoch:
            stats.l2_misses += 1  # written before the last epoch bump: void
            return None
        try:
            row = codec.loads(value[sep + 1 :])
        except ValueError:
            log.warning("ignoring a malformed cached %s at %s", codec.entity, key)
            stats.l2_misses += 1
            return None
        stats.l2_hits += 1
        return row

    def read_value(self, key: str, codec: QueryCodec[Any]) -> Any:
        """The L1 form of the query result at ``key``, or NO_VALUE."""
        stats = self.stats
        client = self.client
        assert client is not None
        raw = cast("bytes | None", self.breaker.call(lambda: client.get(key), None))
        if raw is None:
            stats.l2_misses += 1
            return NO_VALUE
        try:
            frozen = codec.from_json(serialization.loads(raw))
        except ValueError:
            log.warning("ignoring a malformed cached value at %s", key)
            stats.l2_misses += 1
            return NO_VALUE
        stats.l2_hits += 1
        return frozen

    def fill_row(self, codec: RowCodec[Any], key: str, gen: int, row: Row) -> None:
        """Queue the fenced fill of ``row``: written only if the entity's
        generation is still ``gen`` when Redis runs it."""
        entity = codec.entity
        stats = self.stats

        def on_reply(written: Any) -> None:
            if written:
                stats.l2_fills += 1
            else:
                stats.fills_refused += 1

        sha = self._fill_sha or self._load_fill_script()
        self.filler.submit(
            on_reply,
            *(("EVALSHA", sha) if sha else ("EVAL", scripts.FILL_ENTITY)),
            3,
            key,
            self.keys.generation(entity),
            self.keys.epoch(entity),
            str(gen),
            codec.dumps(row),
            int(self._row_ttl[entity] * 1000),
            self._counter_ttl_ms,
            on_error=self._fill_refused,
        )

    def _load_fill_script(self) -> str | None:
        client = self.client
        assert client is not None
        sha = self.breaker.call(lambda: client.script_load(scripts.FILL_ENTITY), None)
        if isinstance(sha, bytes):
            sha = sha.decode()
        self._fill_sha = sha if isinstance(sha, str) else None
        return self._fill_sha

    def _fill_refused(self, err: ResponseError) -> None:
        if isinstance(err, NoScriptError):
            self._fill_sha = None  # Redis restarted or flushed its scripts: load again

    def fill_plain(self, key: str, text: str, ttl: float) -> None:
        """Queue a plain SET (query results: their key carries the generation)."""
        stats = self.stats

        def on_reply(_: Any) -> None:
            stats.l2_fills += 1

        self.filler.submit(on_reply, "SET", key, text, "PX", int(ttl * 1000))
