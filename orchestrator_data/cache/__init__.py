"""The multi-level cache: L1 in-process LRU -> L2 Redis -> PostgreSQL.

One concept per module: ``serialization`` (JSON-safe rows, cheap
hydration), ``backends`` (the dogpile backends of both levels), ``regions``
(their declaration and configuration), ``keys``, ``breaker`` (Redis circuit
breaker), ``broadcast`` (pub/sub of L1 invalidations), ``invalidation``
(what a commit invalidates), ``scripts`` (Lua), ``filler`` (background L2
writes), ``stats``, and ``layer`` (the :class:`Cache` tying them together).
"""

from orchestrator_data.cache.layer import Cache
from orchestrator_data.cache.regions import CacheRegions

__all__ = ["Cache", "CacheRegions"]
