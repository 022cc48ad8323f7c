"""Change capture: every write made through a DataLayer session becomes a
:class:`~orchestrator_data.capture.change.Change`, the one mechanism the
audit trail (during the flush) and the caches (after the commit) build on.

Modules: ``change`` (the record of one write), ``change_capture`` (the
session events: flushes, commits, rollbacks, savepoints), ``statements``
(ORM bulk and Core statements run through ``session.execute``), ``session``
(the Session class that routes legacy bulk methods through the capture),
``session_info`` (the ``Session.info`` keys a unit of work sets for the hooks).

May import: ``errors``, ``models``.
"""
