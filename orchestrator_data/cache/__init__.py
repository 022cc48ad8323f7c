"""The multi-level cache: L1 in-process LRU -> L2 Redis -> PostgreSQL.

One concept per module: ``serialization`` (JSON-safe rows, cheap
hydration), ``query_codecs`` (how query results are cached), ``backends``
(the dogpile backends of both levels), ``regions`` (their declaration and
configuration), ``keys``, ``breaker`` (Redis circuit breaker), ``broadcast``
(pub/sub subscriber), ``invalidation`` (what a commit invalidates),
``coherence`` (generations, invalidation, broadcast handling, recovery),
``scripts`` (Lua), ``l2`` (epoch-checked reads, fenced fills), ``filler``
(batched, unacknowledged L2 writes), ``stats``, and ``layer`` (the
:class:`Cache` tying them together, and the read-through paths).

May import: ``capture``, ``config``, ``errors``, ``models``.
"""

from orchestrator_data.cache.layer import Cache
from orchestrator_data.cache.regions import CacheRegions

__all__ = ["Cache", "CacheRegions"]
