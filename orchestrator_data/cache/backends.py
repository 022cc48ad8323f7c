"""dogpile.cache backends of the two levels.

``orchestrator_data.lru`` (L1): an in-process, bounded ``cachetools`` LRU,
thread-safe, with a deadline per entry so that nothing older than its TTL is
ever returned (dogpile would otherwise hand an expired value to concurrent
callers while one of them regenerates it). An optional ``admit`` callback,
run under the backend's lock, refuses fills that an invalidation overtook.

``orchestrator_data.redis`` (L2): Redis through a client the DataLayer built
(its retry and timeout settings), values as bytes from the region's JSON
serializer, a TTL on every key. Every call goes through a circuit breaker:
while Redis is down a get is a miss and a set is dropped, without waiting; a
command Redis refuses is a miss too, without opening the breaker. A value
that is not one dogpile wrote (garbage bytes, a foreign format) is a miss:
it is deleted and reported to ``on_corrupt``, never raised.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import cachetools
from dogpile.cache import register_backend
from dogpile.cache.api import (
    NO_VALUE,
    BackendFormatted,
    CacheBackend,
    KeyType,
    SerializedReturnType,
)
from redis import Redis

from orchestrator_data.cache.breaker import CircuitBreaker

Admit = Callable[[str, Any], bool]


class LRUBackend(CacheBackend):
    """Bounded in-process LRU (L1). Arguments: ``max_entries`` (default
    10 000), ``ttl`` seconds (default 60), ``ttl_for`` a ``key -> seconds``
    function overriding ``ttl`` per key, ``admit`` a ``(key, value) -> bool``
    veto consulted under the lock at every set."""

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        self.max_entries = int(arguments.get("max_entries", 10_000))
        ttl = float(arguments.get("ttl", 60.0))
        self._ttl_for: Callable[[str], float] = arguments.get("ttl_for") or (lambda key: ttl)
        self._admit: Admit | None = arguments.get("admit")
        self._lru: cachetools.LRUCache[str, tuple[float, Any]] = cachetools.LRUCache(
            self.max_entries
        )
        #: Held by invalidations too, so a fill cannot slip between an
        #: invalidation's generation bump and its deletes.
        self.lock = threading.Lock()
        self._clock = time.monotonic

    def get(self, key: KeyType) -> Any:
        with self.lock:
            try:
                entry = self._lru[key]  # one lookup (LRUCache.get makes two)
            except KeyError:
                return NO_VALUE
            if entry[0] < self._clock():
                # Under the same lock as the lookup: a fresh set() cannot land
                # between the expiry check and the delete and be lost.
                del self._lru[key]
                return NO_VALUE
            return entry[1]

    def get_multi(self, keys: Iterable[KeyType]) -> Sequence[BackendFormatted]:
        return [self.get(k) for k in keys]

    def set(self, key: KeyType, value: Any) -> None:
        deadline = self._clock() + self._ttl_for(key)
        with self.lock:
            if self._admit is None or self._admit(key, value):
                self._lru[key] = (deadline, value)

    def set_multi(self, mapping: Mapping[KeyType, Any]) -> None:
        for k, v in mapping.items():
            self.set(k, v)

    def delete(self, key: KeyType) -> None:
        with self.lock:
            self._lru.pop(key, None)

    def delete_multi(self, keys: Iterable[KeyType]) -> None:
        with self.lock:
            for k in keys:
                self._lru.pop(k, None)

    # -- beyond the dogpile API ------------------------------------------------

    def discard_locked(self, keys: Iterable[Any]) -> None:
        """Delete ``keys``; the caller holds :attr:`lock`."""
        for k in keys:
            self._lru.pop(k, None)

    def clear_locked(self) -> None:
        """Drop everything; the caller holds :attr:`lock`."""
        self._lru.clear()

    def keys_locked(self) -> list[Any]:
        """Every key; the caller holds :attr:`lock`."""
        return list(self._lru.keys())

    def __len__(self) -> int:
        return len(self._lru)


class RedisBackend(CacheBackend):
    """Redis (L2). Arguments: ``client`` (a ``redis.Redis``), ``breaker``
    (a :class:`CircuitBreaker`), ``ttl`` seconds (default 600) or ``ttl_for``
    a ``key -> seconds`` function. Keys arrive already prefixed (the region's
    key mangler)."""

    serializer = None
    deserializer = None

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        self.client: Redis = arguments["client"]
        self.breaker: CircuitBreaker = arguments.get("breaker") or CircuitBreaker()
        ttl = float(arguments.get("ttl", 600.0))
        self._ttl_for: Callable[[str], float] = arguments.get("ttl_for") or (lambda key: ttl)
        self._on_corrupt: Callable[[str], object] | None = arguments.get("on_corrupt")

    def get_serialized(self, key: KeyType) -> SerializedReturnType:
        value = self.breaker.call(lambda: self.client.get(key), None)
        return self._checked(key, value)

    def get_serialized_multi(self, keys: Iterable[KeyType]) -> Sequence[SerializedReturnType]:
        wanted = list(keys)
        if not wanted:
            return []
        values = self.breaker.call(lambda: self.client.mget(wanted), None)
        if values is None:
            return [NO_VALUE] * len(wanted)
        # MGET answers one value per key: zip's lengths match.
        return [self._checked(k, v) for k, v in zip(wanted, values)]  # noqa: B905

    def _checked(self, key: KeyType, value: Any) -> SerializedReturnType:
        # dogpile parses the metadata half of the value itself, outside any
        # error handling, and then indexes it: anything else must not reach it.
        if value is None:
            return NO_VALUE
        data = _as_bytes(value) if isinstance(value, (bytes, str)) else b""
        if _is_dogpile_value(data):
            return data
        self.breaker.call(lambda: self.client.delete(key), None)
        if self._on_corrupt is not None:
            self._on_corrupt(str(key))
        return NO_VALUE

    def set_serialized(self, key: KeyType, value: bytes) -> None:
        ms = int(self._ttl_for(key) * 1000)
        self.breaker.call(lambda: self.client.set(key, value, px=ms), None)

    def set_serialized_multi(self, mapping: Mapping[KeyType, bytes]) -> None:
        def write() -> None:
            pipe = self.client.pipeline(transaction=False)
            for k, v in mapping.items():
                pipe.set(k, v, px=int(self._ttl_for(k) * 1000))
            pipe.execute()

        self.breaker.call(write, None)

    def delete(self, key: KeyType) -> None:
        self.breaker.call(lambda: self.client.delete(key), None)

    def delete_multi(self, keys: Iterable[KeyType]) -> None:
        # A list, not the iterable: an empty generator is truthy, and DEL
        # without keys is a command error.
        wanted = list(keys)
        if wanted:
            self.breaker.call(lambda: self.client.delete(*wanted), None)


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _is_dogpile_value(data: bytes) -> bool:
    """Whether ``data`` looks like dogpile's ``{metadata json}|{payload}``."""
    head, sep, _ = data.partition(b"|")
    if not sep or not head.startswith(b"{") or len(head) > 200:
        return False
    try:
        metadata = json.loads(head)
    except (ValueError, RecursionError):
        return False
    return (
        isinstance(metadata, dict)
        and isinstance(metadata.get("ct"), (int, float))
        and isinstance(metadata.get("v"), int)
    )


register_backend("orchestrator_data.lru", "orchestrator_data.cache.backends", "LRUBackend")  # type: ignore[no-untyped-call]
register_backend("orchestrator_data.redis", "orchestrator_data.cache.backends", "RedisBackend")  # type: ignore[no-untyped-call]
