"""L2 operations of the repositories' read paths, beyond the dogpile API:
epoch-checked row reads, generation-stamped values, and fenced fills.

Row values are stored as ``{epoch}:{generation}|{json}``; a value whose
epoch is not the entity's current one (``cache:epoch:{entity}``) is void,
which lets one counter bump drop every cached row of an entity without a
SCAN. The generation is the one the fill was fenced with: a value filled at
or before a reader's fence is the row as of that fence (any change since
would have deleted the key), one filled later may not be, and a read-only
reader is told :data:`MOVED` instead (see views.py).

A value that cannot be one of ours (garbage bytes, another JSON shape, a
string where a count belongs, JSON nested too deeply, the row of another id)
is a miss: counted in ``corrupt_values``, deleted, never raised, never
returned.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Final

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


class _Moved:
    def __repr__(self) -> str:
        return "MOVED"


#: What a row read answers a checked view when the row was filled after its fence.
MOVED: Final = _Moved()


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

    def read_row(
        self, codec: RowCodec[Any], key: str, ident: uuid.UUID, fence: int | None = None
    ) -> Row | _Moved | None:
        """The row at ``key`` if it carries the entity's current epoch (and
        is the row of ``ident``), else None. With ``fence`` (a checked view's
        generation of the entity): :data:`MOVED` if the row was filled under
        a later generation, so maybe after a change the fence predates. One
        round trip: value and epoch in one MGET."""
        stats = self.stats
        client = self.client
        assert client is not None
        entity = codec.entity
        epoch_key = self.keys.epoch(entity)
        found: list[Any] = self.breaker.call(lambda: client.mget(key, epoch_key), [])
        value, epoch = (found[0], found[1]) if len(found) == 2 else (None, None)
        if not isinstance(value, bytes) or not isinstance(epoch, bytes):
            stats.l2_misses += 1
            return None
        # ``{epoch}:{generation}|{json}`` (``{epoch}|{json}`` before the
        # generation was stamped: usable, but not by a checked view).
        sep = value.find(b"|")
        head = value[:sep] if sep > 0 else b""
        stamp, colon, filled_text = head.partition(b":")
        if sep < 0 or stamp != epoch:
            stats.l2_misses += 1  # written before the last epoch bump: void
            return None
        filled = int(filled_text) if colon and filled_text.isdigit() else None
        if fence is not None:
            if filled is None:
                stats.l2_misses += 1
                return None
            if filled > fence:
                return MOVED
        try:
            row = codec.loads(value[sep + 1 :])
            if codec.ident_of(row) != ident:
                raise ValueError(f"the cached {entity} at {key} is another row")
        except ValueError as err:
            self.corrupt(key, err)
            return None
        stats.l2_hits += 1
        return row

    def read_value(self, key: str, codec: QueryCodec[Any]) -> Any:
        """The L1 form of the query result at ``key`` (whose name carries the
        generation it belongs to), or NO_VALUE."""
        stats = self.stats
        client = self.client
        assert client is not None
        raw = self.breaker.call(lambda: client.get(key), None)
        if not isinstance(raw, bytes):
            stats.l2_misses += 1
            return NO_VALUE
        try:
            frozen = codec.from_json(serialization.loads(raw))
        except ValueError as err:
            self.corrupt(key, err)
            return NO_VALUE
        stats.l2_hits += 1
        return frozen

    def corrupt(self, key: str, err: BaseException) -> None:
        """Count, log and delete a value at ``key`` that cannot be ours."""
        self.stats.l2_misses += 1
        self.stats.corrupt_values += 1
        log.warning("deleting a corrupt cache value at %s (%s)", key, err)
        client = self.client
        if client is not None:
            self.breaker.call(lambda: client.delete(key), None)

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
            _ms(self._row_ttl[entity]),
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

        self.filler.submit(on_reply, "SET", key, text, "PX", _ms(ttl))


def _ms(seconds: float) -> int:
    # PX 0 is a command error: never ask for less than a millisecond.
    return max(1, int(seconds * 1000))
