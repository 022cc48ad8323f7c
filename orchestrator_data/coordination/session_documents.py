"""The Redis side of the session store: the document a session is kept as,
the Lua scripts that update, restore, claim and retire it, and the
:class:`StoredSession` the store hands back.

The document is JSON: ``user_id``, ``data``, ``version``, ``ip``,
``user_agent``, ``created_at`` and ``persisted_at`` (epoch milliseconds).
Each value of ``data`` is held as its own JSON text, so the scripts move
fields without parsing a user's value (Redis' cjson would turn ``[]`` into
``{}`` and round numbers to 14 digits). A document that does not decode is a
miss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from orchestrator_data.models import Session as SessionRow

_UNREADABLE = (
    "if not ok or type(doc) ~= 'table' or type(doc.data) ~= 'table' "
    "or type(doc.version) ~= 'number' then"
)

# KEYS: session. ARGV: changes (field -> JSON text, or false: delete),
# expected version ('' for any), data size limit. Returns {1, document, pttl},
# {0, sha1 of an unreadable value or ''}, {-1, version} (stale), {-2} (too large).
UPDATE_SCRIPT = f"""
local raw = redis.call('GET', KEYS[1])
if not raw then return {{0, ''}} end
local ok, doc = pcall(cjson.decode, raw)
{_UNREADABLE}
  return {{0, redis.sha1hex(raw)}}
end
if ARGV[2] ~= '' and doc.version ~= tonumber(ARGV[2]) then return {{-1, doc.version}} end
for name, value in pairs(cjson.decode(ARGV[1])) do
  if value == false then doc.data[name] = nil else doc.data[name] = value end
end
local size = 2
for name, value in pairs(doc.data) do
  if type(value) ~= 'string' then return {{0, redis.sha1hex(raw)}} end
  size = size + #name + #value + 4
end
if size > tonumber(ARGV[3]) then return {{-2}} end
doc.version = doc.version + 1
local out = cjson.encode(doc)
redis.call('SET', KEYS[1], out, 'KEEPTTL')
return {{1, out, redis.call('PTTL', KEYS[1])}}
"""

# KEYS: session, tombstone. ARGV: document, ttl ms, sha1 of the unreadable
# value to replace ('' if none). Returns the live document (the one given, or
# one written meanwhile, its TTL slid), or nil when the key was retired.
RESTORE_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
local cur = redis.call('GET', KEYS[1])
if cur and redis.sha1hex(cur) ~= ARGV[3] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return cur
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ARGV[1]
"""

# KEYS: session. ARGV: persisted_at seen, new persisted_at. 1 when it moved
# (this caller writes the durable expiry through), else 0.
CLAIM_SCRIPT = f"""
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local ok, doc = pcall(cjson.decode, raw)
{_UNREADABLE}
  return 0
end
if doc.persisted_at ~= tonumber(ARGV[1]) then return 0 end
doc.persisted_at = tonumber(ARGV[2])
redis.call('SET', KEYS[1], cjson.encode(doc), 'KEEPTTL')
return 1
"""

# KEYS: session, tombstone. ARGV: tombstone ttl ms, '1' to leave a tombstone
# even if Redis holds nothing. Deletes the document; returns it (or nil).
RETIRE_SCRIPT = """
local raw = redis.call('GET', KEYS[1])
if raw or ARGV[2] == '1' then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
end
return raw
"""


@dataclass(frozen=True)
class StoredSession:
    """A session as the store returns it (the issue's ``Session``; the model
    of the ``sessions`` table has that name). ``key`` is the caller's secret:
    kept out of the repr."""

    key: str = field(repr=False)
    user_id: str
    data: dict[str, Any]
    version: int
    ip: str | None
    user_agent: str | None
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class SessionDocument:
    user_id: str
    data: dict[str, Any]
    version: int
    ip: str | None
    user_agent: str | None
    created_at: int  # epoch ms
    persisted_at: int  # epoch ms: when expires_at was last written to PostgreSQL

    def encode(self) -> str:
        return json_text(
            {
                "user_id": self.user_id,
                "data": {name: json_text(value) for name, value in self.data.items()},
                "version": self.version,
                "ip": self.ip,
                "user_agent": self.user_agent,
                "created_at": self.created_at,
                "persisted_at": self.persisted_at,
            }
        )

    @classmethod
    def decode(cls, raw: bytes | str | None) -> SessionDocument | None:
        """The document in ``raw``; None when absent or unreadable (a miss)."""
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
            texts, user_id, ip, agent = doc["data"], doc["user_id"], doc["ip"], doc["user_agent"]
            numbers = (doc["version"], doc["created_at"], doc["persisted_at"])
            if (
                not isinstance(texts, dict)
                or not isinstance(user_id, str)
                or not all(type(n) is int for n in numbers)
                or not all(v is None or isinstance(v, str) for v in (ip, agent))
            ):
                return None
            data = {name: json.loads(text) for name, text in texts.items()}
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        version, created_at, persisted_at = numbers
        return cls(user_id, data, version, ip, agent, created_at, persisted_at)

    @classmethod
    def of_row(cls, row: SessionRow, ttl_ms: int) -> tuple[SessionDocument, int]:
        """The document of a ``sessions`` row, and its expiry (epoch ms)."""
        assert row.expires_at is not None  # the store's rows always have one
        expires = epoch_ms(row.expires_at)
        doc = cls(
            row.user_id or "",
            dict(row.data),
            row.version,
            None if row.ip_address is None else str(row.ip_address),
            row.user_agent,
            epoch_ms(row.created_at),
            expires - ttl_ms,  # expires_at was written ttl after it was persisted
        )
        return doc, expires

    def session(self, key: str, expires_ms: int) -> StoredSession:
        return StoredSession(
            key=key,
            user_id=self.user_id,
            data=self.data,
            version=self.version,
            ip=self.ip,
            user_agent=self.user_agent,
            created_at=from_epoch_ms(self.created_at),
            expires_at=from_epoch_ms(expires_ms),
        )


def json_text(value: Any) -> str:
    """``value`` as compact JSON (NaN refused)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def epoch_ms(moment: datetime) -> int:
    """``moment`` in milliseconds since the epoch."""
    return round(moment.timestamp() * 1000)


def from_epoch_ms(ms: int) -> datetime:
    """Milliseconds since the epoch as an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, timezone.utc)
