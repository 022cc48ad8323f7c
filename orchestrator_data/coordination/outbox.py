"""The unit of work's outbox: messages published with ``uow.events.publish``
(:class:`UnitOfWorkEvents`, from :func:`outbox`) wait in their transaction
until it commits, and :class:`TransactionEvents`, installed on a session
factory, then hands them to ``dl.events`` to send.

The messages are queued in the transaction's ``Session.info``, one frame per
savepoint: a savepoint that rolls back drops its messages, a released one
hands them to its parent. After the outermost COMMIT, once the transaction
has ended and its connection is back in the pool, they go to the sender
thread of :class:`~orchestrator_data.coordination.events.Events`, which
publishes them in commit order, never raising into the committing code; a
rollback drops them (counted in ``dropped_on_rollback``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import event
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import SessionTransaction, sessionmaker

from orchestrator_data.coordination.events import Encoded, Events
from orchestrator_data.coordination.payloads import encode_payload
from orchestrator_data.errors import OrchestratorDataError

_FRAMES = "orchestrator_data.events.frames"
_SENDER = "orchestrator_data.events.sender"


@dataclass
class _Frame:
    """The messages queued in one transaction or savepoint."""

    transaction: SessionTransaction
    messages: list[Encoded] = field(default_factory=list)
    committed: bool = False


def _frame(frames: list[_Frame], transaction: SessionTransaction | None) -> _Frame | None:
    for frame in reversed(frames):
        if frame.transaction is transaction:
            return frame
    return None


class TransactionEvents:
    """Queues ``uow.events`` messages per transaction and publishes them
    after the outermost commit (see the module doc). One per DataLayer,
    installed on each of its session factories."""

    def __init__(self, events: Events) -> None:
        self.events = events

    def install(self, factory: sessionmaker[OrmSession]) -> None:
        """Attach to ``factory``'s sessions (never to the global Session). Install
        it after the change capture, so that caches are invalidated before
        subscribers hear of the commit."""
        event.listen(factory, "after_transaction_create", self._after_transaction_create)
        event.listen(factory, "after_commit", self._after_commit)
        event.listen(factory, "after_transaction_end", self._after_transaction_end)

    def _after_transaction_create(
        self, session: OrmSession, transaction: SessionTransaction
    ) -> None:
        if transaction.parent is None:
            session.info[_FRAMES] = [_Frame(transaction)]
            session.info[_SENDER] = self
        elif transaction.nested:
            session.info.setdefault(_FRAMES, []).append(_Frame(transaction))

    def _after_commit(self, session: OrmSession) -> None:
        # Dispatched while the committing transaction (a released savepoint,
        # or the root) is still the current one.
        current = session.get_nested_transaction() or session.get_transaction()
        frame = _frame(session.info.get(_FRAMES) or [], current)
        if frame is not None:
            frame.committed = True

    def _after_transaction_end(self, session: OrmSession, transaction: SessionTransaction) -> None:
        frames: list[_Frame] = session.info.get(_FRAMES) or []
        frame = _frame(frames, transaction)
        if frame is None:
            return  # a flush's subtransaction, or begun before install
        frames.remove(frame)
        if frame.committed and transaction.nested and frames:
            frames[-1].messages.extend(frame.messages)  # released: joins its parent
        elif frame.committed and transaction.parent is None:
            # Committed, and the connection is back in the pool.
            self.events.send_after_commit(frame.messages)
        elif frame.messages:
            self.events.count("dropped_on_rollback", len(frame.messages))


class UnitOfWorkEvents:
    """``uow.events``: publish after this unit of work commits."""

    def __init__(self, session: OrmSession) -> None:
        self._session = session

    def publish(self, channel: str, payload: object) -> None:
        """Queue ``payload`` (JSON, checked now) for ``channel``: published after
        the commit, dropped if the transaction, or the savepoint it was
        queued in, rolls back."""
        session = self._session
        current = session.get_nested_transaction() or session.get_transaction()
        if current is None:
            current = session.begin()  # right after a commit: the next transaction
        sender: TransactionEvents | None = session.info.get(_SENDER)
        frame = _frame(session.info.get(_FRAMES) or [], current)
        if sender is None or frame is None:
            raise OrchestratorDataError(
                "events are not installed on this session's factory (TransactionEvents.install)"
            )
        frame.messages.append((sender.events.channel_key(channel), encode_payload(payload)))


def outbox(session: OrmSession) -> UnitOfWorkEvents:
    """The ``uow.events`` of the unit of work running on ``session``."""
    return UnitOfWorkEvents(session)
