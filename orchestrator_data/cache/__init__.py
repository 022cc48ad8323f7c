"""The multi-level cache: L1 in-process LRU -> L2 Redis -> PostgreSQL.

One concept per module: ``serialization`` (JSON-safe rows, cheap
hydration, the checks that refuse corrupt values), ``query_codecs`` (how
query results are cached), ``backends`` (the dogpile backends of both
levels), ``regions`` (their declaration and configuration), ``keys``,
``breaker`` (Redis circuit breaker: outages open it, command errors do not),
``broadcast`` (pub/sub subscriber), ``invalidation`` (what a commit
invalidates), ``coherence`` (generations, invalidation, broadcast handling,
recovery), ``journal`` (the PostgreSQL log of invalidations Redis could not
take, and its delivery), ``scripts`` (Lua), ``l2`` (epoch- and
generation-checked reads, fenced fills), ``filler`` (batched,
unacknowledged L2 writes), ``views`` (what a transaction read through the
cache; one committed state per read-only unit of work), ``reads`` (the
read-through paths), ``stats``, and ``layer`` (the :class:`Cache` tying them
together).

May import: ``capture``, ``config``, ``errors``, ``models``.
"""

from orchestrator_data.cache.layer import Cache
from orchestrator_data.cache.regions import CacheRegions

__all__ = ["Cache", "CacheRegions"]
