"""What the spool stores, and the interface every store (SQLite now, PostgreSQL later) implements.

The spool is the durable truth: a message is acknowledged only once ``enqueue`` has returned, and a
restart rebuilds the scheduler's in-memory lanes from ``pending``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class State(StrEnum):
    QUEUED = "queued"
    INFLIGHT = "inflight"
    DEFERRED = "deferred"
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


def message_row(msg: Message) -> tuple:
    """A message's columns, in the order both stores' ``messages`` tables declare them."""
    return (msg.id, msg.cls, msg.pool, msg.mail_from, msg.queued_at, msg.deadline, msg.expire_at,
            msg.priority, msg.size, msg.envid, msg.ret, msg.correlation_id, msg.message_id,
            msg.listener, msg.auth_user, msg.client)


def update_rows(updates: list[RecipientUpdate]) -> list[tuple]:
    """Parameters of both stores' recipient UPDATE statement."""
    return [(u.state.value, u.attempts, u.next_attempt, u.last_reply, u.msg_id, u.idx)
            for u in updates]


class Spool(Protocol):
    """The store contract. Writes are batched; ``enqueue`` returns only once durable."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def enqueue(self, msg: Message, rcpts: list[Recipient], body: bytes,
                      urgent: bool = False) -> None: ...

    def update(self, updates: list[RecipientUpdate]) -> None: ...

    def finish(self, msg_id: str) -> None: ...

    def body(self, msg_id: str) -> bytes: ...

    async def pending(self) -> Pending: ...

    async def set_paused(self, pool: str, domain: str, paused: bool) -> None: ...

    async def paused(self) -> set[tuple[str, str]]: ...

    async def flush(self) -> None: ...
