"""What the spool stores, and the interface every store (SQLite now, PostgreSQL later) implements.

The spool is the durable truth: a message is acknowledged only once ``enqueue`` has returned, and a
restart rebuilds the scheduler's in-memory lanes from ``pending``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from ..accounting.records import Record
    from .writer import CommitStats


class State(StrEnum):
    QUEUED = "queued"
    INFLIGHT = "inflight"
    DEFERRED = "deferred"
    HELD = "held"
    """Put on hold by an operator: not delivered until released (``postlane queue hold``)."""
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    SUPPRESSED = "suppressed"


class SpoolUnavailable(RuntimeError):
    """A write could not be committed (database unreachable, disk error): intake answers 451
    and the client sends again; nothing acknowledged is lost."""


FINAL_STATES = frozenset({State.DELIVERED, State.BOUNCED, State.EXPIRED, State.SUPPRESSED})


@dataclass(slots=True, eq=False)
class Message:
    """Envelope and metadata of one accepted message (the body lives in the spool, not here)."""

    id: str
    cls: str
    pool: str
    mail_from: str
    queued_at: float
    deadline: float
    expire_at: float
    priority: int
    size: int = 0
    envid: str = ""
    ret: str = ""
    correlation_id: str = ""
    message_id: str = ""
    listener: str = ""
    auth_user: str = ""
    client: str = ""
    smtputf8: bool = False
    """The message asked for SMTPUTF8 (the client's MAIL parameter, or non-ASCII addresses or
    header fields in a message made here or given to the API): UTF-8 in its envelope or header
    then needs a next hop that offers SMTPUTF8 (RFC 6531 3.2; relay/client.py)."""
    remaining: int = 0
    """Recipients not yet in a final state; in memory only."""


@dataclass(slots=True, eq=False)
class Recipient:
    msg: Message
    idx: int
    address: str
    domain: str
    orcpt: str = ""
    notify: str = ""
    state: State = State.QUEUED
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: str = ""
    open_attempt: Attempt | None = None
    """An attempt the spool says was started and never settled (the node stopped during it):
    set when the recipient is loaded again, so the trail can say its outcome is unknown."""
    pending: str = ""
    """An operator's hold or delete asked while this recipient was being delivered, to apply
    when that delivery ends unless it delivered (``operator.py``, ``pending_action``); kept
    in the spool (SQLite) so a restart applies it."""
    counted: bool = False
    """Counted in its lane's ages (``Lane.ages``) until final; in memory only."""


@dataclass(slots=True)
class Attempt:
    """An attempt about to send its final dot: marked durably first, so a crash before its
    outcome is recorded leaves a trace (see ``Spool.mark``)."""

    msg_id: str
    idx: int
    started: float
    info: str
    """The connection as JSON (source IP, EHLO name, MX, destination IP, TLS)."""
    number: int = 0
    """Which attempt of its recipient this is (its attempts so far, plus one)."""


@dataclass(slots=True)
class RecipientUpdate:
    msg_id: str
    idx: int
    state: State
    attempts: int
    next_attempt: float
    last_reply: str


@dataclass(slots=True)
class Pending:
    """What a restart needs: every message with at least one recipient still to deliver."""

    messages: list[Message] = field(default_factory=list)
    recipients: list[Recipient] = field(default_factory=list)


def message_row(msg: Message) -> tuple[Any, ...]:
    """A message's columns, in the order both stores' ``messages`` tables declare them."""
    return (msg.id, msg.cls, msg.pool, msg.mail_from, msg.queued_at, msg.deadline, msg.expire_at,
            msg.priority, msg.size, msg.envid, msg.ret, msg.correlation_id, msg.message_id,
            msg.listener, msg.auth_user, msg.client, msg.smtputf8)


def update_rows(updates: list[RecipientUpdate]) -> list[tuple[Any, ...]]:
    """Parameters of both stores' recipient UPDATE statement (which also clears the attempt
    mark: an outcome settles the attempt)."""
    return [(u.state.value, u.attempts, u.next_attempt, u.last_reply, u.msg_id, u.idx)
            for u in updates]


def new_writer_id(node: str) -> str:
    """A spool writer's name: the node and a stamp unique to this start. Events are numbered
    densely per writer, so a gap in a writer's numbers in the audit store is a lost event."""
    return f"{node or 'node'}/{int(time.time() * 1000):x}{os.urandom(3).hex()}"


class Spool(Protocol):
    """The store contract. Writes are batched; ``enqueue`` returns only once durable.

    The spool is also the evidence outbox: every accounting record is written as an *event*
    in the same transaction as the state change it describes (``events`` arguments), numbered
    densely per writer (``writer_id``); the recorder feeds the audit store and the accounting
    files from these events and ``trim`` drops the ones it has consumed."""

    HEALTH_KEY: ClassVar[str]
    """The ``Health`` key the spool's outage is reported (and counted) under."""
    writer_id: str
    events_written: int
    """The number of this writer's last committed event (the recorder's backlog is the
    distance to it)."""
    stats: CommitStats
    """The writer's commits and their durations (``postlane_spool_commit_seconds``)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def enqueue(self, msg: Message, rcpts: list[Recipient], body: bytes,
                      urgent: bool = False, events: Sequence[Record] = (),
                      finals: Sequence[RecipientUpdate] = ()) -> None:
        """Return once the message, its recipients and ``events`` are committed; ``finals``
        (other messages' recipients, whose records are among ``events``) in the same commit."""
        ...

    def update(self, updates: list[RecipientUpdate], events: Sequence[Record] = (),
               urgent: bool = False) -> None: ...

    def pend(self, rows: list[tuple[str, str, int]], events: Sequence[Record] = ()) -> None:
        """Set (or with "" clear) the operator action waiting for a recipient's delivery in
        progress, (pending, msg_id, idx) rows, with its records in the same commit."""
        ...

    def record(self, events: Sequence[Record], urgent: bool = False) -> None:
        """Events without a state change (complaints, refusals …); durable at the next commit
        (``flush`` waits for it), kept for the one after if that fails."""
        ...

    def mark(self, attempts: list[Attempt], urgent: bool = False) -> asyncio.Future[None]:
        """Mark attempts as started; the final dot is sent only once the future is done."""
        ...

    def trim(self, consumed: Mapping[str, int]) -> None:
        """Drop each writer's events up to the number the recorder has consumed."""
        ...

    def finish(self, msg_id: str) -> None: ...

    def body(self, msg_id: str) -> bytes:
        """The message's bytes (KeyError if unknown); may read the disk: not on the loop."""
        ...

    async def load_body(self, msg_id: str) -> bytes:
        """``body`` for the event loop: a read from disk happens in a thread."""
        ...

    async def pending(self) -> Pending: ...

    async def set_paused(self, pool: str, domain: str, paused: bool,
                         events: Sequence[Record] = ()) -> None:
        """Pause or resume a pool (domain "*") or lane, with the record of it (``events``)."""
        ...

    async def paused(self) -> set[tuple[str, str]]: ...

    async def has_event(self, data: bytes) -> bool:
        """Whether an event of exactly ``data`` (a packed record) is still in the outbox: a
        record written a second time after a crash is looked for here, then in the store."""
        ...

    async def events_naming(self, text: str) -> list[Record]:
        """The records still in the outbox whose packed bytes contain ``text`` (a queue id):
        what is committed and not yet in the store, which a look-up there cannot see."""
        ...

    async def flush(self) -> None: ...

