"""Coordination in Redis, one module per primitive, on the coordination
Redis (``COORDINATION_REDIS_URL``, defaulting to ``REDIS_URL``): ``locks``
(fenced locks with hand-off), ``rate_limit`` (exact sliding windows on the
server's clock), ``presence`` (agent state by heartbeat), the session store
and events; ``keys`` names their keys (one hash tag per object).

May import: ``capture``, ``config``, ``errors``, ``models``, ``repositories``, ``schemas``, ``uow``.
"""
