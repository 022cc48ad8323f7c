"""Coordination in Redis, one module per primitive, on the coordination
Redis (``COORDINATION_REDIS_URL``, defaulting to ``REDIS_URL``): ``locks``
(fenced locks with hand-off), ``rate_limit`` (exact sliding windows on the
server's clock), ``presence`` (agent state by heartbeat), the session store
(``sessions``, ``session_documents``) and events: ``events`` (``dl.events``,
the face of pub/sub and streams, and the after-commit sender),
``subscriptions`` (pub/sub subscriber threads), ``outbox`` (``uow.events``,
queued per transaction and savepoint until commit), ``change_events`` (the
package's own events), ``streams`` (durable streams and their scripts),
``consumers`` (stream consumer groups) and ``payloads`` (the JSON codec of
messages and entries); ``keys`` names their keys (one hash tag per object).

May import: ``capture``, ``config``, ``errors``, ``models``, ``repositories``, ``schemas``, ``uow``.
"""
