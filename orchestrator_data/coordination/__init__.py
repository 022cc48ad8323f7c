"""Coordination in Redis: locks with fencing tokens, rate limits, the
session store, agent presence, events (issue 9 builds them here, one module
per primitive, on the coordination Redis ``COORDINATION_REDIS_URL``).

May import: ``capture``, ``config``, ``errors``, ``models``, ``repositories``, ``uow``.
"""
