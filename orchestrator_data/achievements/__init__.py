"""Achievements: the award rules run when an agent completes a task, and the
points totals and leaderboard cached in Redis.

Modules: ``awards`` (the rules, evaluated in the completing transaction),
``stats`` (cached totals and leaderboard, invalidated after commits that
change achievements). Each takes the pieces it needs (a Redis client, the
cache's breaker, a reader of units of work, the change capture), never the
whole DataLayer.

May import: ``cache``, ``capture``, ``errors``, ``models``, ``repositories``, ``uow``.
"""
