"""Keys of ``Session.info`` through which a unit of work tells the hooks who
acts and how.

The unit of work sets them when it opens its session; the audit trail reads
the actor and correlation id, the cache the read-only flag. They live here,
beside the capture the hooks build on, so that neither the audit trail nor
the cache has to import the unit of work.
"""

#: The :class:`~orchestrator_data.Actor` of the unit of work.
INFO_ACTOR = "orchestrator_data.actor"
#: Whether the unit of work is read-only (the cache serves only those by default).
INFO_READ_ONLY = "orchestrator_data.read_only"
#: The isolation level of the unit of work's transaction.
INFO_ISOLATION = "orchestrator_data.isolation"
#: The correlation id that lands on every audit row of the unit of work.
INFO_CORRELATION_ID = "orchestrator_data.correlation_id"
