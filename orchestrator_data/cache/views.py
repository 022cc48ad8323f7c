"""What one transaction has read through the cache, and the rule that keeps
a read-only unit of work on one committed state.

A transaction's *fence* is the generation of every entity as this process
knew it when the transaction was created, before its first statement (see
layer.py). A cached value of entity E read under the fence is E as of the
fence, as long as E's generation has not moved since. PostgreSQL reads see
the transaction's snapshot, which REPEATABLE READ and SERIALIZABLE (READ
ONLY DEFERRABLE) take at the first statement, at some moment after the fence.
Both agree exactly when no commit changed E between the fence and the
snapshot. Read-only units of work at those levels (*checked* views) keep to
that rule:

- Until the first PostgreSQL read, E is served from the cache only while its
  generation is the fence's (and L1 entries filled at or before the fence:
  they are E as of the fence even after other rows of E changed).
- Right after the first PostgreSQL read (hence after the snapshot), the view
  is *verified*: if an entity it already served from the cache has moved,
  cached and database results may come from two committed states, and the
  read raises :class:`~orchestrator_data.errors.ReadSkewError`, which
  ``run_in_transaction`` retries like a serialization failure. Entities that
  moved but were not served are read from PostgreSQL from then on.
- After that, an entity whose generation moves (the commit came after the
  snapshot) is read from PostgreSQL, which still shows the snapshot.
- An L2 row carries the generation it was filled under; a checked view
  takes only rows filled at or before its fence. A later one means Redis
  has an invalidation whose broadcast has not arrived yet, and a served
  entity stops the unit of work the same way.

What remains is the delivery delay of invalidations: a commit whose
invalidation has not reached this process yet (the writer is between its
COMMIT and its after-commit call, or the broadcast is on its way, typically
well under a millisecond) can be seen by the snapshot while the cache still
serves the value before it. READ COMMITTED takes a snapshot per statement, so
a read-only unit of work there promises, like PostgreSQL, only that each
result is a committed state no older than the unit of work; views at that
level are not checked.
"""

from __future__ import annotations

from orchestrator_data.cache.stats import CacheStats
from orchestrator_data.errors import ReadSkewError

#: Isolation levels whose snapshot lasts the whole transaction.
SNAPSHOT_LEVELS = frozenset({"REPEATABLE READ", "SERIALIZABLE"})

#: entity -> generation (None: do not use the cache for it).
Fence = dict[str, "int | None"]


class ReadView:
    """The cache's view of one transaction (``Session.info``)."""

    __slots__ = ("checked", "fence", "served", "verified")

    def __init__(self, fence: Fence | None) -> None:
        #: None: the cache was not usable when the transaction began.
        self.fence = fence
        #: Whether the read-only rule applies (decided at the first read:
        #: the unit of work sets its flags after the transaction exists).
        self.checked: bool | None = None
        #: Entities this transaction has served from the cache.
        self.served: set[str] = set()
        #: The snapshot has been taken and the served entities checked against it.
        self.verified = False

    def moved(self, entity: str, stats: CacheStats, *, in_redis: bool = False) -> None:
        """``entity`` changed after the fence and its value as of the fence is
        not at hand: the read goes to PostgreSQL. Raises ReadSkewError if the
        transaction already served ``entity`` and the snapshot may show the
        change (not verified yet, or, ``in_redis``, an L2 row shows a change
        this process has not heard of, which may predate the snapshot)."""
        if entity in self.served and (in_redis or not self.verified):
            stats.read_skews += 1
            raise ReadSkewError(
                f"a read-only unit of work read {entity} from the cache, and a commit "
                "changed it before its database snapshot; retry it (run_in_transaction does)"
            )

    def database_read(self, generations: Fence, stats: CacheStats) -> None:
        """After a PostgreSQL read (which took the snapshot if none was)."""
        if self.verified:
            return
        self.verified = True
        fence = self.fence
        if fence is None:
            return
        for entity, gen in fence.items():
            if gen is not None and generations.get(entity) != gen:
                # A commit of ``entity`` landed between the fence and now:
                # the snapshot may show it, so the cache may not, any more.
                fence[entity] = None
                if entity in self.served:
                    stats.read_skews += 1
                    raise ReadSkewError(
                        f"a read-only unit of work read {entity} from the cache, and a "
                        "commit changed it before its database snapshot; retry it "
                        "(run_in_transaction does)"
                    )
