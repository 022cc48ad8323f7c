"""The session store: live sessions in Redis, their durable copy in PostgreSQL.

``SessionStore.create`` hands out a key of 256 random bits
(``secrets.token_urlsafe(32)``, 43 characters). Only its SHA-256 (hex) is
kept anywhere: in ``sessions.session_key`` and in the Redis key
``{prefix}{session:<sha256>}``, so neither a database reader (audit rows
included) nor a Redis ``KEYS`` dump yields a usable key; the key itself goes
back to the caller only, and no error message or repr quotes it. A
malformed key is a :class:`ValidationError` on ``key`` (treat it as no
session); a well-formed one without a live session is ``None`` from ``get``
and :class:`NotFoundError` from ``update`` and ``regenerate``. Sessions come
back as :class:`StoredSession` (the issue's ``Session``: the model of the
``sessions`` table has that name).

**The Redis document** (``session_documents``) holds the session's fields;
its expiry is the key's TTL, not a field: ``get`` slides it with ``GETEX``
(one round trip), which could not rewrite a field. A document that does not
decode is a miss.

**Updates** are one Lua script: check ``expected_version`` (when given),
merge ``changes`` field by field (a ``None`` value deletes the field), bump
``version``, keep the TTL. Concurrent updates of different fields therefore
both survive; a stale ``expected_version`` raises :class:`SessionConflictError`
(a :class:`ConflictError`). Then the durable copy is written with
``UPDATE ... WHERE version < :new``: of two concurrent write-throughs the
newer one wins whichever commits first.

**The durable copy** (``sessions``: data, version, ip, user agent,
``expires_at``) is written through units of work at READ COMMITTED (one row
each, the racing writes conditional), so it is audited like any write: the
audit rows hold the hash, never the key. Reads slide only Redis; ``expires_at`` in
PostgreSQL follows at most once per tenth of the TTL per session (the reader
that moves ``persisted_at`` in the document by compare-and-set writes it).
When Redis has no (readable) document, ``get`` reads the row by hash where
``expires_at`` is still ahead and writes it back to Redis, version kept.

**Destroy and regenerate** retire a key in PostgreSQL first, then in Redis,
where a tombstone beside the document (same hash tag, ``TOMBSTONE_TTL``)
stops a ``get`` that read the row just before from restoring the key
afterwards. ``regenerate`` renames the row to the new hash, takes the old
document out of Redis (whatever a concurrent update put in it until then)
and writes it under the new key: steps on two hash tags, each one command
on one slot, so Redis Cluster safe. The row is renamed first, so the old
key never restores again; a crash before the old document is taken leaves
the old key usable in Redis until its TTL (call ``destroy`` on it), and when
writing the new document fails, the new key restores from the row on its
first ``get``.

**When Redis is down** reads (``get``, ``touch``) answer from PostgreSQL,
sliding ``expires_at`` there at most once per tenth of the TTL. Writes need
Redis, the live copy: :class:`SessionStoreUnavailableError`, after undoing
what was written to PostgreSQL where that can be done (``create``,
``regenerate``). ``destroy`` has deleted the row by then, so the key cannot
come back from PostgreSQL, but Redis may keep it usable until its TTL: call
``destroy`` again. A failed write-through (PostgreSQL down or timing out) is
logged and left to the next write of the session, which carries the whole
document.

**Limits.** The durable copy is written after Redis: an update that Redis
took but whose write-through failed is lost if Redis then loses the key,
and a version number can be reused after such a loss. ``expires_at`` in
PostgreSQL may lag the Redis TTL by a tenth of the TTL, so
:meth:`SessionStore.purge_expired` deletes rows expired longer ago than
that. Times come from the clocks of the calling hosts (kept in sync).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from functools import partial
from typing import Any, Protocol, TypeVar

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import delete, select, update

from orchestrator_data.coordination.keys import tagged
from orchestrator_data.coordination.session_documents import (
    CLAIM_SCRIPT,
    RESTORE_SCRIPT,
    RETIRE_SCRIPT,
    UPDATE_SCRIPT,
    SessionDocument,
    StoredSession,
    from_epoch_ms,
    json_text,
)
from orchestrator_data.errors import (
    DatabaseTimeoutError,
    DatabaseUnavailableError,
    NotFoundError,
    OrchestratorDataError,
    RetryExhaustedError,
    SessionConflictError,
    SessionStoreUnavailableError,
    ValidationError,
)
from orchestrator_data.models import Session as SessionRow
from orchestrator_data.repositories.sessions import MAX_DATA_SIZE, check_field
from orchestrator_data.uow import UnitOfWork

log = logging.getLogger("orchestrator_data.coordination.sessions")

T = TypeVar("T")

#: Random bytes of a session key (256 bits).
KEY_BYTES = 32
_KEY_FORMAT = re.compile(r"[A-Za-z0-9_-]{43}")
#: How long a retired key stays refused to a restore (seconds).
TOMBSTONE_TTL = 300
#: User agents are cut to this many characters.
MAX_USER_AGENT = 1024
#: Rows deleted per transaction by purge_expired.
PURGE_BATCH = 1000
# Failures of a write-through that are logged, not raised.
_DATABASE_DOWN = (DatabaseUnavailableError, DatabaseTimeoutError, RetryExhaustedError)
_ISOLATION = "READ COMMITTED"


class Transactions(Protocol):
    """How the store runs its units of work: ``dl.run_in_transaction``."""

    def __call__(
        self, fn: Callable[[UnitOfWork], T], *, isolation: str | None = ..., read_only: bool = ...
    ) -> T: ...


class SessionStore:
    """``dl.session_store``: see the module doc. ``client`` is the
    coordination Redis, ``run`` runs units of work (``dl.run_in_transaction``),
    ``ttl`` is the idle lifetime in seconds (``Settings.ttls.session``)."""

    def __init__(
        self, client: Redis, *, run: Transactions, prefix: str = "", ttl: float = 3600
    ) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl >= 0.01:
            raise ValidationError({"ttl": ["Must be a number of seconds, at least 0.01."]})
        self._client = client
        self._run = run
        self._prefix = prefix
        self._ttl_ms = int(ttl * 1000)
        #: How often, at most, a read writes the expiry through (a tenth of the TTL).
        self._interval_ms = self._ttl_ms // 10
        self._update = client.register_script(UPDATE_SCRIPT)
        self._restore_script = client.register_script(RESTORE_SCRIPT)
        self._claim = client.register_script(CLAIM_SCRIPT)
        self._retire = client.register_script(RETIRE_SCRIPT)
        self._redis_down = False

    # -- public ------------------------------------------------------------------

    def create(
        self,
        user_id: str,
        data: Mapping[str, Any],
        ip: str | None = None,
        user_agent: str | None = None,
    ) -> StoredSession:
        """Start a session; its ``.key`` goes to the client (a cookie) and
        nowhere else. :class:`ValidationError` naming the field for a bad
        ``user_id`` (1 to 255 characters), ``data`` (a JSON object), ``ip``
        or ``user_agent`` (cut to :data:`MAX_USER_AGENT` characters)."""
        if not isinstance(user_id, str) or not user_id:
            raise ValidationError({"user_id": ["Must be a non-empty string."]}, entity="session")
        if isinstance(user_agent, str):
            user_agent = user_agent[:MAX_USER_AGENT]
        fields = {
            "user_id": check_field("user_id", user_id),
            "data": check_field("data", dict(data) if isinstance(data, Mapping) else data),
            "ip_address": check_field("ip_address", ip, name="ip"),
            "user_agent": check_field("user_agent", user_agent),
        }
        key = secrets.token_urlsafe(KEY_BYTES)
        digest = _digest(key)
        now = _now_ms()

        def insert(uow: UnitOfWork) -> tuple[SessionDocument, int]:
            row = uow.sessions.create(
                session_key=digest, expires_at=from_epoch_ms(now + self._ttl_ms), **fields
            )
            return SessionDocument.of_row(row, self._ttl_ms)

        doc, expires = self._run(insert, isolation=_ISOLATION)
        try:
            self._client.set(self._key(digest), doc.encode(), px=self._ttl_ms, nx=True)
        except RedisError as err:
            # Nobody holds the key of that row; remove it rather than wait for the purge.
            self._quietly(partial(_delete_row, digest), "remove the row of a session not created")
            raise _unavailable("create", err) from err
        return doc.session(key, expires)

    def get(self, key: str) -> StoredSession | None:
        """The live session of ``key``, its TTL slid to the full TTL in the
        same round trip; None when there is none (expired, destroyed,
        regenerated, never existed). If Redis lost it, PostgreSQL restores
        it; if Redis is down, PostgreSQL answers."""
        digest = _digest(key)
        try:
            raw = self._client.getex(self._key(digest), px=self._ttl_ms)
        except RedisError as err:
            # One warning per outage, not one per read.
            (log.debug if self._redis_down else log.warning)(
                "session store: Redis unavailable, reading PostgreSQL: %s", err
            )
            self._redis_down = True
            return self._from_postgres(key, digest)
        if self._redis_down:
            self._redis_down = False
            log.warning("session store: Redis is back")
        now = _now_ms()
        doc = SessionDocument.decode(raw)
        if doc is None:
            return self._restore(key, digest, _sha1(raw))
        self._write_through_expiry(digest, doc, now)
        return doc.session(key, now + self._ttl_ms)

    def touch(self, key: str) -> bool:
        """Slide the session's TTL (as :meth:`get` does); False if there is none."""
        return self.get(key) is not None

    def update(
        self, key: str, changes: Mapping[str, Any], expected_version: int | None = None
    ) -> StoredSession:
        """Set the fields of ``changes`` in the session's data (a ``None``
        value deletes that field; the others are kept), bump ``version``,
        keep the TTL; return the new state. With ``expected_version``, only
        if the session is at that version: :class:`SessionConflictError`
        otherwise. :class:`NotFoundError` when there is no live session."""
        digest = _digest(key)
        if not isinstance(changes, Mapping) or not changes:
            raise ValidationError({"changes": ["Must be a non-empty JSON object."]})
        changes = check_field("data", dict(changes), name="changes")
        if expected_version is not None and (
            isinstance(expected_version, bool)
            or not isinstance(expected_version, int)
            or expected_version < 1
        ):
            raise ValidationError({"expected_version": ["Must be a positive integer."]})
        encoded = json_text({n: False if v is None else json_text(v) for n, v in changes.items()})
        expected = "" if expected_version is None else str(expected_version)
        for attempt in range(2):
            try:
                reply = self._update(
                    keys=[self._key(digest)], args=[encoded, expected, MAX_DATA_SIZE]
                )
            except RedisError as err:
                raise _unavailable("update", err) from err
            status = int(reply[0])
            if status == 1:
                break
            if status == -1:
                raise SessionConflictError(int(expected), int(reply[1]))
            if status == -2:
                raise ValidationError(
                    {"changes": [f"The session's data would exceed {MAX_DATA_SIZE} bytes."]}
                )
            if attempt or self._restore(key, digest, _text(reply[1])) is None:
                raise NotFoundError("session", "with this key")
        doc = SessionDocument.decode(reply[1])
        if doc is None:  # cannot be: the script wrote what it decoded
            raise OrchestratorDataError("session store: unreadable document after update")
        self._quietly(partial(_write_version, digest, doc), "write a session update through")
        return doc.session(key, _now_ms() + max(0, int(reply[2])))

    def destroy(self, key: str) -> bool:
        """End the session in PostgreSQL, then in Redis; True if there was
        one. See the module doc for Redis being down."""
        digest = _digest(key)
        deleted = self._run(partial(_delete_row, digest), isolation=_ISOLATION)
        try:
            held = self._retire(
                keys=self._keys(digest), args=[TOMBSTONE_TTL * 1000, "1" if deleted else "0"]
            )
        except RedisError as err:
            raise _unavailable("destroy", err, done="removed from PostgreSQL; ") from err
        return bool(deleted or held is not None)

    def regenerate(self, key: str) -> StoredSession:
        """The same session (data, version, user, creation time) under a new
        key, the old one gone for good (against session fixation); the TTL
        starts again. :class:`NotFoundError` when there is no live session."""
        old = _digest(key)
        new_key = secrets.token_urlsafe(KEY_BYTES)
        new = _digest(new_key)
        now = _now_ms()
        expires = now + self._ttl_ms
        row = self._run(partial(self._rename, old, new, now, expires), isolation=_ISOLATION)
        if row is None:
            raise NotFoundError("session", "with this key")
        doc, row_expires = row
        try:
            live = SessionDocument.decode(
                self._retire(keys=self._keys(old), args=[TOMBSTONE_TTL * 1000, "1"])
            )
        except RedisError as err:
            self._quietly(partial(self._rename_back, new, old), "undo a session regeneration")
            raise _unavailable("regenerate", err) from err
        if live is None and row_expires <= now:
            # Expired since (the row may lag the Redis TTL): nothing to move.
            self._quietly(partial(_delete_row, new), "remove an expired session")
            raise NotFoundError("session", "with this key")
        if live is not None and live.version > doc.version:
            # Redis is ahead of the row (a write-through failed): the row follows.
            self._quietly(partial(_write_version, new, live), "write a session through")
        newest = live if live is not None and live.version >= doc.version else doc
        moved = replace(newest, persisted_at=now)
        try:
            self._client.set(self._key(new), moved.encode(), px=self._ttl_ms, nx=True)
        except RedisError as err:
            # The old key is retired; the new one restores from the row on first get.
            log.warning("session store: regenerated session not written to Redis: %s", err)
        return moved.session(new_key, expires)

    def purge_expired(self) -> int:
        """Delete the rows of sessions that expired (longer ago than a tenth of
        the TTL, which ``expires_at`` may lag Redis by); return how many. Each
        batch of :data:`PURGE_BATCH` is a unit of work, audited. Redis keys
        expire by their TTL."""
        cutoff = from_epoch_ms(_now_ms() - self._interval_ms)
        total = 0
        while True:
            done = self._run(partial(_purge_batch, cutoff), isolation=_ISOLATION)
            total += done
            if done < PURGE_BATCH:
                return total

    def redis_key(self, key: str) -> str:
        """The Redis key holding the session of ``key`` (it names the hash only)."""
        return self._key(_digest(key))

    # -- Redis misses and outages ----------------------------------------------------

    def _restore(self, key: str, digest: str, seen: str) -> StoredSession | None:
        """The session from its row, written back to Redis (replacing the
        unreadable value whose SHA-1 is ``seen``, if any)."""
        started = time.monotonic()
        found = self._run(
            partial(self._read, digest, _now_ms()), isolation=_ISOLATION, read_only=True
        )
        if found is None:
            return None
        doc, expires = found
        if time.monotonic() - started > TOMBSTONE_TTL / 2:
            return doc.session(key, expires)  # too old to write back past a tombstone
        try:
            raw = self._restore_script(
                keys=self._keys(digest), args=[doc.encode(), self._ttl_ms, seen]
            )
        except RedisError as err:
            log.warning("session store: could not restore a session to Redis: %s", err)
            return doc.session(key, expires)
        if raw is None:
            return None  # destroyed or regenerated meanwhile
        now = _now_ms()
        live = SessionDocument.decode(raw) or doc
        self._write_through_expiry(digest, live, now)
        return live.session(key, now + self._ttl_ms)

    def _from_postgres(self, key: str, digest: str) -> StoredSession | None:
        now = _now_ms()
        found = self._run(partial(self._read, digest, now), isolation=_ISOLATION, read_only=True)
        if found is None:
            return None
        doc, expires = found
        if now - doc.persisted_at >= self._interval_ms:
            # Slide in PostgreSQL, so an outage longer than the TTL ends no session.
            extended = now + self._ttl_ms
            if self._quietly(partial(_extend_row, digest, extended), "slide a session"):
                expires = extended
        return doc.session(key, expires)

    def _write_through_expiry(self, digest: str, doc: SessionDocument, now: int) -> None:
        """Write the slid expiry to PostgreSQL if a tenth of the TTL passed
        since the last time; only the reader that moved ``persisted_at`` writes."""
        if now - doc.persisted_at < self._interval_ms:
            return
        key = self._key(digest)
        try:
            if not self._claim(keys=[key], args=[doc.persisted_at, now]):
                return
        except RedisError as err:
            log.warning("session store: could not claim a write-through: %s", err)
            return
        extend = partial(_extend_row, digest, now + self._ttl_ms)
        if not self._quietly(extend, "write a session's expiry through"):
            try:  # let the next reader try again
                self._claim(keys=[key], args=[now, doc.persisted_at])
            except RedisError as err:
                log.warning("session store: could not release a write-through: %s", err)

    # -- units of work -------------------------------------------------------------

    def _read(self, digest: str, now: int, uow: UnitOfWork) -> tuple[SessionDocument, int] | None:
        row = uow.session.scalars(
            select(SessionRow).where(
                SessionRow.session_key == digest, SessionRow.expires_at > from_epoch_ms(now)
            )
        ).first()
        return None if row is None else SessionDocument.of_row(row, self._ttl_ms)

    def _rename(
        self, old: str, new: str, now: int, expires: int, uow: UnitOfWork
    ) -> tuple[SessionDocument, int] | None:
        # A row that expired less than a write-through interval ago may still
        # be live in Redis; one that expired before cannot be.
        row = uow.session.scalars(
            select(SessionRow)
            .where(
                SessionRow.session_key == old,
                SessionRow.expires_at > from_epoch_ms(now - self._interval_ms),
            )
            .with_for_update()
        ).first()
        if row is None:
            return None
        found = SessionDocument.of_row(row, self._ttl_ms)
        row.session_key = new
        row.expires_at = from_epoch_ms(expires)
        uow.session.flush()
        return found

    def _rename_back(self, new: str, old: str, uow: UnitOfWork) -> None:
        uow.session.execute(
            update(SessionRow)
            .where(SessionRow.session_key == new)
            .values(session_key=old)
            .execution_options(synchronize_session=False)
        )

    def _quietly(self, fn: Callable[[UnitOfWork], object], what: str) -> bool:
        """Run ``fn`` in a unit of work; log (not raise) PostgreSQL being
        unavailable. True if it committed."""
        try:
            self._run(fn, isolation=_ISOLATION)
        except _DATABASE_DOWN as err:
            log.warning("session store: could not %s: %s", what, err)
            return False
        return True

    def _key(self, digest: str) -> str:
        return tagged(self._prefix, "session", digest)

    def _keys(self, digest: str) -> list[str]:
        key = self._key(digest)
        return [key, key + ":gone"]


# -- statements (each one conditional statement, at READ COMMITTED) -----------------


def _write_version(digest: str, doc: SessionDocument, uow: UnitOfWork) -> None:
    uow.session.execute(
        update(SessionRow)
        .where(SessionRow.session_key == digest, SessionRow.version < doc.version)
        .values(data=doc.data, version=doc.version)
        .execution_options(synchronize_session=False)
    )


def _extend_row(digest: str, expires: int, uow: UnitOfWork) -> None:
    moment = from_epoch_ms(expires)
    uow.session.execute(
        update(SessionRow)
        .where(SessionRow.session_key == digest, SessionRow.expires_at < moment)
        .values(expires_at=moment)
        .execution_options(synchronize_session=False)
    )


def _delete_row(digest: str, uow: UnitOfWork) -> int:
    result = uow.session.execute(
        delete(SessionRow)
        .where(SessionRow.session_key == digest)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _purge_batch(cutoff: datetime, uow: UnitOfWork) -> int:
    ids = list(
        uow.session.scalars(
            select(SessionRow.id)
            .where(SessionRow.expires_at < cutoff)
            .limit(PURGE_BATCH)
            .with_for_update(skip_locked=True)
        )
    )
    if ids:
        uow.session.execute(
            delete(SessionRow)
            .where(SessionRow.id.in_(ids))
            .execution_options(synchronize_session=False)
        )
    return len(ids)


# -- helpers ---------------------------------------------------------------------------


def _digest(key: object) -> str:
    """The SHA-256 (hex) of a well-formed session key; the error never quotes it."""
    if not isinstance(key, str) or not _KEY_FORMAT.fullmatch(key):
        raise ValidationError({"key": ["Not a session key."]}, entity="session")
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def _sha1(raw: bytes | str | None) -> str:
    if raw is None:
        return ""
    data = raw if isinstance(raw, bytes) else raw.encode()
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()  # as Redis' sha1hex


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _unavailable(action: str, err: RedisError, done: str = "") -> SessionStoreUnavailableError:
    return SessionStoreUnavailableError(
        f"session {action} needs the coordination Redis, which failed "
        f"({type(err).__name__}: {err}); {done}retry when it is back"
    )
