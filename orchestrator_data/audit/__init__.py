"""The audit trail: one ``audit_logs`` row per captured change, written in
the changing transaction; a resource's history; retention.

Modules: ``trail`` (the writer, subscribed to the change capture's flushes),
``history`` (a resource's history as a text table, for the CLI),
``retention`` (pruning old rows, itself audited), ``jsonsafe`` (values as
JSON that PostgreSQL accepts).

May import: ``actor``, ``capture``, ``errors``, ``models``, ``uow``.
"""
