"""The two dogpile regions, declared without a backend and configured when
a DataLayer starts (dogpile's two-phase configuration: nothing connects or
reads settings at import).

``l1``: ``orchestrator_data.lru``, the in-process bounded LRU.
``l2``: ``orchestrator_data.redis``, Redis, values through a JSON
serializer (never pickle); a value that does not decode is a miss.

A DataLayer declares a fresh pair unless given one, so several DataLayers in
one process (tests, tools) never share entries. An application that wants to
decorate functions at import time (``@default.l2.cache_on_arguments()``)
passes :data:`default` to its DataLayer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dogpile.cache import CacheRegion, make_region
from dogpile.cache.api import CantDeserializeException

import orchestrator_data.cache.backends  # noqa: F401 - registers the backends
from orchestrator_data.cache import serialization


def _serialize(value: Any) -> bytes:
    return serialization.dumps(value).encode()


def _deserialize(data: bytes) -> Any:
    try:
        return serialization.loads(data)
    except (ValueError, RecursionError) as err:
        raise CantDeserializeException() from err  # dogpile: a miss


@dataclass(frozen=True)
class CacheRegions:
    l1: CacheRegion
    l2: CacheRegion

    @classmethod
    def declare(cls, name: str = "orchestrator_data") -> CacheRegions:
        """Two unconfigured regions named ``{name}.l1`` and ``{name}.l2``."""
        return cls(
            l1=make_region(name=f"{name}.l1"),
            l2=make_region(name=f"{name}.l2", serializer=_serialize, deserializer=_deserialize),
        )

    def configure(self, *, l1: Mapping[str, Any], l2: Mapping[str, Any]) -> None:
        """Give both regions their backends (arguments of LRUBackend / RedisBackend)."""
        self.l1.configure(
            "orchestrator_data.lru", arguments=dict(l1), replace_existing_backend=True
        )
        self.l2.configure(
            "orchestrator_data.redis", arguments=dict(l2), replace_existing_backend=True
        )


#: Regions an application may decorate at import time and hand to its DataLayer.
default = CacheRegions.declare()
