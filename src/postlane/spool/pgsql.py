"""What every part of the PostgreSQL spool shares: reaching the database (``CONNECT_TIMEOUT``,
``UNREACHABLE``, ``redact``), its clock (``NOW``: lease and heartbeat times use the database's,
so node clocks never decide who owns a row), the column lists, and rows read back as a
``Message`` or ``Recipient``."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from .base import Attempt, Message, Recipient, State

__all__ = ["CONNECT_TIMEOUT", "LOAD_COLS", "MSG_COLS", "NOW", "OPEN", "RCPT_COLS",
           "UNREACHABLE", "message_of", "recipient_of", "redact"]

UNREACHABLE = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
               asyncpg.exceptions.OperatorInterventionError)
"""What a database that is away (down, restarting, cut off, failing over) raises."""
CONNECT_TIMEOUT = 5.0
"""Seconds to reach the database before a write fails: an SMTP client waiting for its 250
during a failover gets a 451 soon, not after asyncpg's default minute."""

NOW = "extract(epoch from clock_timestamp())::float8"
OPEN = "('queued', 'deferred', 'inflight', 'held')"
"""Not final: a message keeps its row while one of its recipients is in one of these."""

MSG_COLS = ("id, cls, pool, mail_from, queued_at, deadline, expire_at, priority, size, envid,"
            " ret, correlation_id, message_id, listener, auth_user, client, smtputf8")
RCPT_COLS = ("msg_id, idx, address, domain, orcpt, notify, state, attempts, next_attempt,"
             " last_reply")
LOAD_COLS = RCPT_COLS + ", attempt_started, attempt_info, pending"
"""What a node reads back of a recipient: with the mark of an attempt never settled, and the
operator's action waiting for a delivery (``Recipient.pending``)."""


def redact(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def message_of(m: Mapping) -> Message:
    return Message(
        id=m["id"], cls=m["cls"], pool=m["pool"], mail_from=m["mail_from"],
        queued_at=m["queued_at"], deadline=m["deadline"], expire_at=m["expire_at"],
        priority=m["priority"], size=m["size"], envid=m["envid"] or "", ret=m["ret"] or "",
        correlation_id=m["correlation_id"] or "", message_id=m["message_id"] or "",
        listener=m["listener"] or "", auth_user=m["auth_user"] or "", client=m["client"] or "",
        smtputf8=bool(m["smtputf8"]))


def recipient_of(row: Mapping, msg: Message) -> Recipient:
    state = State(row["state"])
    return Recipient(
        msg=msg, idx=row["idx"], address=row["address"], domain=row["domain"],
        orcpt=row["orcpt"] or "", notify=row["notify"] or "",
        state=State.QUEUED if state is State.INFLIGHT else state, attempts=row["attempts"],
        next_attempt=row["next_attempt"], last_reply=row["last_reply"] or "",
        open_attempt=None if row["attempt_started"] is None else Attempt(
            row["msg_id"], row["idx"], row["attempt_started"], row["attempt_info"] or ""),
        pending=row["pending"])
