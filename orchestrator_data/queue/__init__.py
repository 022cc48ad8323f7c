"""The task queue on the ``tasks`` table: transactional enqueue, priority
claims with leases, fenced completion (issue 10 builds it here).

May import: ``capture``, ``config``, ``coordination``, ``db``, ``errors``,
``models``, ``repositories``, ``uow``.
"""
