"""Agent presence: each agent's live state in Redis, kept alive by heartbeats.

``heartbeat(agent_id, status=None, metrics=None)`` stores the agent's state
under ``{prefix}{agent:ID}:presence`` for ``ttls.agent_state`` (5 min) and
notes it in the online index ``{prefix}{agents:online}`` (a sorted set by
last heartbeat). An agent that stops beating is gone once its key expires.

A heartbeat that changes the status writes it through to the ``agents``
table in a unit of work, so the audit trail keeps the history of status
changes (and the package's ``agent.status`` event is published after that
commit); a heartbeat that repeats the status, or sends none, writes nothing
to PostgreSQL. The time of a heartbeat is the Redis server's clock.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from redis import Redis

from orchestrator_data.coordination.keys import tagged
from orchestrator_data.errors import ValidationError
from orchestrator_data.models import AGENT_STATUSES

#: Largest metrics document of one heartbeat, in bytes of JSON.
MAX_METRICS_BYTES = 16_384

# KEYS: the agent's state. ARGV: status ('' keeps the stored one), metrics
# JSON ('' keeps the stored ones), ttl s, agent id. Returns {previous status
# or '', the new state JSON}.
_BEAT = """
local old = redis.call('GET', KEYS[1])
local doc = {}
if old then
  local ok, decoded = pcall(cjson.decode, old)
  if ok and type(decoded) == 'table' then doc = decoded end
end
local previous = doc['status']
if type(previous) ~= 'string' then previous = '' end
if ARGV[1] ~= '' then doc['status'] = ARGV[1] end
if ARGV[2] ~= '' then doc['metrics'] = cjson.decode(ARGV[2]) end
if type(doc['metrics']) ~= 'table' then doc['metrics'] = cjson.decode('{}') end
local t = redis.call('TIME')
doc['seen_at'] = tonumber(t[1]) + tonumber(t[2]) / 1000000
doc['agent_id'] = ARGV[4]
local encoded = cjson.encode(doc)
redis.call('SET', KEYS[1], encoded, 'EX', tonumber(ARGV[3]))
return {previous, encoded}
"""


@dataclass(frozen=True)
class AgentState:
    """An agent's live state: its last ``status`` (None if it never sent
    one), its last ``metrics``, and when it was last seen (Redis time)."""

    agent_id: uuid.UUID
    status: str | None
    seen_at: datetime
    metrics: dict[str, Any] = field(default_factory=dict)


class AgentPresence:
    """``dl.agent_state``; see the module doc. ``write_status(agent_id,
    status)`` is how a status change reaches PostgreSQL (a unit of work)."""

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "",
        ttl: int = 300,
        write_status: Callable[[uuid.UUID, str], object],
    ) -> None:
        self._client = client
        self._beat = client.register_script(_BEAT)
        self._prefix = prefix
        self._ttl = ttl
        self._write_status = write_status
        self._online = tagged(prefix, "agents", "online")

    def heartbeat(
        self,
        agent_id: uuid.UUID | str,
        status: str | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> AgentState:
        """Record that ``agent_id`` is alive (optionally with a new status and
        metrics); a changed status is written to the ``agents`` table."""
        ident = _agent_id(agent_id)
        if status is not None and status not in AGENT_STATUSES:
            raise ValidationError({"status": [f"Must be one of: {', '.join(AGENT_STATUSES)}."]})
        encoded_metrics = "" if metrics is None else _metrics_json(metrics)
        previous, document = self._beat(
            keys=[self._key(ident)], args=[status or "", encoded_metrics, self._ttl, str(ident)]
        )
        state = _state(document)
        pipe = self._client.pipeline(transaction=False)
        pipe.zadd(self._online, {str(ident): state.seen_at.timestamp()})
        pipe.expire(self._online, self._ttl * 2)
        pipe.execute()
        previous_status = previous.decode() if isinstance(previous, bytes) else str(previous)
        if status is not None and status != previous_status:
            self._write_status(ident, status)
        return state

    def get(self, agent_id: uuid.UUID | str) -> AgentState | None:
        """The live state of ``agent_id``, or None when it is not online."""
        raw = self._client.get(self._key(_agent_id(agent_id)))
        return None if raw is None else _state(raw)

    def list_online(self) -> list[AgentState]:
        """Every agent whose state is alive, most recently seen first."""
        cutoff = self._server_time() - self._ttl
        self._client.zremrangebyscore(self._online, "-inf", f"({cutoff}")
        members = self._client.zrevrangebyscore(self._online, "+inf", cutoff)
        if not members:
            return []
        # One GET each (their keys live in different cluster slots).
        pipe = self._client.pipeline(transaction=False)
        for member in members:
            pipe.get(self._key(uuid.UUID(_text(member))))
        return [_state(raw) for raw in pipe.execute() if raw is not None]

    def _key(self, ident: uuid.UUID) -> str:
        return tagged(self._prefix, "agent", str(ident)) + ":presence"

    def _server_time(self) -> float:
        seconds, micros = self._client.time()
        return float(seconds) + float(micros) / 1_000_000


def _agent_id(value: object) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise ValidationError({"agent_id": ["Must be a UUID."]})


def _metrics_json(metrics: Mapping[str, Any]) -> str:
    if not isinstance(metrics, Mapping) or not all(isinstance(k, str) for k in metrics):
        raise ValidationError({"metrics": ["Must be a JSON object with string keys."]})
    try:
        encoded = json.dumps(dict(metrics), allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        raise ValidationError(
            {"metrics": ["Must be JSON: numbers, strings, lists, objects."]}
        ) from None
    if len(encoded.encode()) > MAX_METRICS_BYTES:
        raise ValidationError({"metrics": [f"Must be at most {MAX_METRICS_BYTES} bytes of JSON."]})
    return encoded


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _state(raw: object) -> AgentState:
    doc = json.loads(_text(raw))
    metrics = doc.get("metrics")
    status = doc.get("status")
    return AgentState(
        agent_id=uuid.UUID(doc["agent_id"]),
        status=status if isinstance(status, str) else None,
        seen_at=datetime.fromtimestamp(float(doc["seen_at"]), timezone.utc),
        metrics=metrics if isinstance(metrics, dict) else {},
    )
