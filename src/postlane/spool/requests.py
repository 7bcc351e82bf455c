"""Operator requests every node of a cluster carries out on the work it holds: "retry now".

Why a row and not only a NOTIFY: a deferred recipient stays with the node that deferred it (its
timers retry it), so a retry sent to one node must reach the node holding the recipient; a
notification is lost by a node whose session is reconnecting, a row is read when it is back.
Each node reads the requests after the last it saw (from the newest at its start: work it claims
later is due anyway); rows older than ``KEEP`` seconds are deleted by the next request.
"""

from __future__ import annotations

import json
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from .pgsql import NOW

__all__ = ["RetryRequest", "RetryRequests"]

KEEP = 3600.0


@dataclass(frozen=True, slots=True)
class RetryRequest:
    id: int
    selector: dict
    """The operator's selector (``scheduler.control.Selector`` as a dict)."""
    lift: bool
    """Also end the backoff of the selector's pool (or lane): ``postlane retry POOL``."""
    node: str
    """The node the operator asked (it has acted on its own share already)."""
    operator: str
    via: str


class RetryRequests:
    """Retry requests shared by a cluster's nodes (a mixin of ``PostgresSpool``, which supplies
    ``acquire`` and ``retry_channel``)."""

    if TYPE_CHECKING:  # supplied by PostgresSpool
        retry_channel: str

        def acquire(self) -> AbstractAsyncContextManager[asyncpg.Connection]: ...

    async def request_retry(self, selector: dict, lift: bool, node: str, operator: str,
                            via: str) -> None:
        """Ask every node to retry its deferred recipients that ``selector`` names now; they
        are told at once (NOTIFY), or read it when their session reconnects."""
        async with self.acquire() as conn, conn.transaction():
            await conn.execute(f"DELETE FROM retry_requests WHERE at < {NOW} - $1", KEEP)
            await conn.execute(
                "INSERT INTO retry_requests (selector, lift, node, operator, via, at)"
                f" VALUES ($1::jsonb, $2, $3, $4, $5, {NOW})", json.dumps(selector), lift, node,
                operator, via)
            await conn.execute("SELECT pg_notify($1, '')", self.retry_channel)

    async def last_retry_request(self) -> int:
        """The newest request's id (0: none): a node starting reads only those after it."""
        async with self.acquire() as conn:
            return await conn.fetchval("SELECT coalesce(max(id), 0) FROM retry_requests")

    async def retry_requests(self, after: int) -> list[RetryRequest]:
        """The requests made after request ``after``, oldest first."""
        async with self.acquire() as conn:
            rows = await conn.fetch("SELECT id, selector::text, lift, node, operator, via"
                                    " FROM retry_requests WHERE id > $1 ORDER BY id", after)
        return [RetryRequest(r["id"], json.loads(r["selector"]), r["lift"], r["node"],
                             r["operator"], r["via"]) for r in rows]
