"""The database boundary: building the engine, translating driver errors,
retrying whole transactions.

Modules: ``engine`` (pool sizing, timeouts, TLS, slow-query log),
``driver_errors`` (psycopg2 errors into the package's hierarchy, by SQLSTATE),
``retry`` (whole-transaction retry on serialization failures and deadlocks).
Used by the :class:`~orchestrator_data.DataLayer` when it starts and by every
unit of work it runs.

May import: ``config``, ``errors``, ``metrics``.
"""
