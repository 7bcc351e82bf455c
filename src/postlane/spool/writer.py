"""The group-commit writer both spools use: typed write operations, batches, the failure rule.

Each backend drives it from its own writer (SQLite: a thread; PostgreSQL: a task on the loop)
and supplies the transaction that commits a ``Batch``; what is queued, how a batch is taken
(urgent first, at most ``BATCH_MAX`` operations) and what a failed commit does are decided here,
once:

- an operation somebody waits for (``done``: an acknowledgement, a pause, an attempt mark, a
  flush, an operator's action) is answered only after its commit succeeded; a failed commit
  fails it with ``SpoolUnavailable`` (intake answers 451 and the client sends again), and
  with it every such operation still queued (none waits behind outcomes that cannot land);
- an operation nobody waits for (an outcome, events, a trim, a clean-up) is never dropped: it
  goes back to the front of the queue and into the next commit, after a backoff that doubles
  up to ``BACKOFF_MAX`` seconds, so the message stays recoverable;
- only while the spool is closing does the writer give up, after ``CLOSING_TRIES`` failed
  commits (logged: those recipients are delivered again, a duplicate and never a loss).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .base import Attempt, RecipientUpdate, SpoolUnavailable, State, update_rows

if TYPE_CHECKING:
    from ..accounting.records import Record
    from .base import Recipient

log = logging.getLogger("postlane.spool")

BATCH_MAX = 2000
"""Operations per commit at most: a commit never grows without bound behind a campaign."""
BACKOFF_MAX = 5.0
CLOSING_TRIES = 3


@dataclass(slots=True)
class Enqueue:
    """A new message with its recipients, body and events; answered once durable."""

    message: tuple
    body: tuple[str, bytes]
    recipients: list[tuple]
    events: Sequence[Record]
    done: asyncio.Future
    updates: list[tuple] = field(default_factory=list)
    """Other recipients' state changes committed with it (``base.update_rows``; their records
    are in ``events``): the final states a DSN reports, in the DSN's commit."""


@dataclass(slots=True)
class Update:
    """Recipient state changes (``base.update_rows``) and their events."""

    rows: list[tuple]
    events: Sequence[Record]
    done: None = None


@dataclass(slots=True)
class Pend:
    """Operator actions that wait for a delivery in progress: (pending, msg_id, idx) rows
    ("" clears one), with the record of the request in the same commit."""

    rows: list[tuple[str, str, int]]
    events: Sequence[Record]
    done: None = None


@dataclass(slots=True)
class Events:
    """Events without a state change (complaints, refusals ...)."""

    events: Sequence[Record]
    done: None = None


@dataclass(slots=True)
class Mark:
    """Attempts about to send their final dot: (started, info, msg_id, idx) rows."""

    rows: list[tuple]
    done: asyncio.Future


@dataclass(slots=True)
class Trim:
    """Drop each writer's events up to the number the recorder has consumed."""

    consumed: dict[str, int]
    done: None = None


@dataclass(slots=True)
class Finish:
    """Forget a message whose recipients are all final."""

    msg_id: str
    done: None = None


@dataclass(slots=True)
class Pause:
    """Pause or resume a pool (domain "*") or one of its lanes, with its record."""

    pool: str
    domain: str
    paused: bool
    events: Sequence[Record]
    done: asyncio.Future


@dataclass(slots=True)
class Flush:
    """Answered once everything queued before it is committed."""

    done: asyncio.Future


@dataclass(slots=True)
class Operate:
    """An operator's action on recipients nobody holds (PostgreSQL spool): move those still
    in ``states`` to ``state``; ``moved`` receives them, ``records`` makes their records."""

    recipients: list[Recipient]
    state: State
    states: Sequence[State]
    records: Callable[[list[Recipient]], Sequence[Record]]
    moved: list[Recipient]
    done: asyncio.Future


Op = Enqueue | Update | Pend | Events | Mark | Trim | Finish | Pause | Flush | Operate


@dataclass(slots=True)
class Batch:
    """One commit's operations, gathered by kind in the order they were queued."""

    ops: list[Op]
    messages: list[tuple] = field(default_factory=list)
    bodies: list[tuple[str, bytes]] = field(default_factory=list)
    recipients: list[tuple] = field(default_factory=list)
    updates: list[tuple] = field(default_factory=list)
    pends: list[tuple[str, str, int]] = field(default_factory=list)
    events: list[Record] = field(default_factory=list)
    marks: list[tuple] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    pauses: list[tuple[str, str, bool]] = field(default_factory=list)
    operations: list[Operate] = field(default_factory=list)
    trims: dict[str, int] = field(default_factory=dict)
    waiters: list[asyncio.Future] = field(default_factory=list)

    @classmethod
    def of(cls, ops: list[Op]) -> Batch:
        b = cls(ops)
        for op in ops:
            match op:
                case Enqueue():
                    b.messages.append(op.message)
                    b.bodies.append(op.body)
                    b.recipients.extend(op.recipients)
                    b.updates.extend(op.updates)
                    b.events.extend(op.events)
                case Update():
                    b.updates.extend(op.rows)
                    b.events.extend(op.events)
                case Pend():
                    b.pends.extend(op.rows)
                    b.events.extend(op.events)
                case Events():
                    b.events.extend(op.events)
                case Finish():
                    b.finished.append(op.msg_id)
                case Trim():
                    for writer, n in op.consumed.items():
                        b.trims[writer] = max(n, b.trims.get(writer, 0))
                case Mark():
                    b.marks.extend(op.rows)
                case Pause():
                    b.pauses.append((op.pool, op.domain, op.paused))
                    b.events.extend(op.events)
                case Operate():
                    b.operations.append(op)
            if op.done is not None:
                b.waiters.append(op.done)
        return b


COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Seconds: a commit is what every 250 waits for, so its tail is the acknowledgement's floor."""


class CommitStats:
    """Commits, their operations and how long each took (a histogram kept here, exposed by
    the monitor as ``postlane_spool_commit_seconds``). Updated by the writer only."""

    def __init__(self) -> None:
        self.commits = 0
        self.writes = 0
        """Operations committed."""
        self.seconds = 0.0
        self.buckets = [0] * len(COMMIT_BUCKETS)
        """Commits that took at most each bound (not cumulative; the +Inf count is the rest)."""

    def committed(self, seconds: float, ops: int) -> None:
        self.commits += 1
        self.writes += ops
        self.seconds += seconds
        i = bisect.bisect_left(COMMIT_BUCKETS, seconds)  # the first bound >= seconds
        if i < len(COMMIT_BUCKETS):
            self.buckets[i] += 1


def settle(waiters: Iterable[asyncio.Future], error: BaseException | None) -> None:
    """Answer the operations of a commit (on the event loop): done, or the spool is away."""
    for fut in waiters:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(SpoolUnavailable(f"spool commit failed: {error}"))


class WriteQueue:
    """The queued operations (urgent ones first) and the failure rule. Not locked: the SQLite
    writer calls it under its condition's lock, the PostgreSQL one from the loop."""

    def __init__(self) -> None:
        self.urgent: collections.deque[Op] = collections.deque()
        self.bulk: collections.deque[Op] = collections.deque()
        self.waiters = 0
        """Queued operations somebody waits for: a writer commits those without delay."""
        self.failures = 0
        """Commits failed in a row (0 once one succeeds)."""
        self.failed_commits = 0
        """Commits failed since the spool opened."""
        self.refused: list[asyncio.Future] = []
        """Waits queued at the last failed commit: the writer fails them (``settle``)."""

    def __bool__(self) -> bool:
        return bool(self.urgent or self.bulk)

    def put(self, op: Op, urgent: bool) -> None:
        (self.urgent if urgent else self.bulk).append(op)
        if op.done is not None:
            self.waiters += 1

    def take(self) -> list[Op]:
        """The next batch, at most ``BATCH_MAX`` operations: the urgent ones alone if there
        are any (a policy notice's 250 waits for a small commit, not for the campaign's
        thousand rows beside it), else the bulk."""
        batch: list[Op] = []
        urgent, bulk = self.urgent, self.bulk
        while urgent and len(batch) < BATCH_MAX:
            batch.append(urgent.popleft())
        if not batch:
            while bulk and len(batch) < BATCH_MAX:
                batch.append(bulk.popleft())
        self.waiters -= sum(1 for op in batch if op.done is not None)
        return batch

    def committed(self, ops: list[Op], error: BaseException | None,
                  closing: bool) -> float | None:
        """Apply the failure rule after the commit of ``ops`` (whose waiters the caller
        answers with ``settle``, as it answers ``refused``). Returns the seconds to wait before
        the next commit (0 after a success), or None when a closing writer gives up."""
        if error is None:
            self.failures = 0
            return 0.0
        self.failures += 1
        self.failed_commits += 1
        # Every wait queued now is answered too: behind more kept outcomes than one commit
        # takes it would never be reached while commits fail (a drain hung on a full disk).
        self.refused = [op.done for op in (*self.urgent, *self.bulk) if op.done is not None]
        if self.refused:
            self.urgent = collections.deque(op for op in self.urgent if op.done is None)
            self.bulk = collections.deque(op for op in self.bulk if op.done is None)
            self.waiters = 0
        kept = [op for op in ops if op.done is None]
        if closing and self.failures >= CLOSING_TRIES:
            if kept:
                log.error("spool commit failed while closing: %d outcome writes lost (those"
                          " recipients will be delivered again): %s", len(kept), error)
            return None
        self.bulk.extendleft(reversed(kept))  # never drop an outcome: first into the next commit
        return min(BACKOFF_MAX, 0.1 * 2 ** self.failures)


class GroupCommitWrites:
    """The writes both spools queue for their group-commit writer, as typed operations. A
    backend supplies ``_submit`` (queue it and wake its writer) and may override ``mark``."""

    _writes: WriteQueue
    stats: CommitStats

    @property
    def failed_commits(self) -> int:
        """Commits that failed since the spool opened (their outcomes were retried)."""
        return self._writes.failed_commits

    def _submit(self, op: Op, urgent: bool) -> None:
        raise NotImplementedError

    def _future(self) -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    def update(self, updates: list[RecipientUpdate], events: Sequence[Record] = (),
               urgent: bool = False) -> None:
        """Record recipient state changes and their events; durable at the next commit (a
        crash before it re-delivers, and the attempt mark says so). ``urgent``: before the
        bulk writes queued (so before an urgent write queued after it, as a DSN's)."""
        self._submit(Update(update_rows(updates), events), urgent)

    def pend(self, rows: list[tuple[str, str, int]], events: Sequence[Record] = ()) -> None:
        """Set (or with "" clear) the operator action that waits for a recipient's delivery in
        progress, (pending, msg_id, idx) rows, with its records in the same commit (the
        operator's answer waits for ``flush``)."""
        self._submit(Pend(rows, events), False)

    def record(self, events: Sequence[Record], urgent: bool = False) -> None:
        """Events without a state change (complaints, refusals …); durable at the next commit
        (``flush`` waits for it), kept for the one after if that fails."""
        self._submit(Events(events), urgent)

    def mark(self, attempts: list[Attempt], urgent: bool = False) -> asyncio.Future:
        """Mark attempts as started; the final dot is sent only once the future is done."""
        fut = self._future()
        self._submit(Mark([(a.started, a.info, a.msg_id, a.idx) for a in attempts], fut), urgent)
        return fut

    def trim(self, consumed: Mapping[str, int]) -> None:
        """Drop each writer's events up to the number the recorder has consumed."""
        self._submit(Trim(dict(consumed)), False)

    async def set_paused(self, pool: str, domain: str, paused: bool,
                         events: Sequence[Record] = ()) -> None:
        """A pause (of a pool, or of its lane to ``domain``), with the record of it
        (``events``), durable before it returns."""
        fut = self._future()
        self._submit(Pause(pool, domain, paused, events, fut), True)
        await fut

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed."""
        fut = self._future()
        self._submit(Flush(fut), False)
        await fut
