"""Leases on a cluster's shared spool: who works on which recipient, until when."""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import asyncpg

from .base import Recipient, SpoolUnavailable, State
from .pgsql import LOAD_COLS, NOW, UNREACHABLE

__all__ = ["Leases"]

_CLAIM = f"""WITH c AS (
    SELECT r.msg_id, r.idx FROM recipients r
    WHERE r.pool = $1 AND r.state = '{{state}}' AND r.next_attempt <= $2
      AND (r.lease_owner IS NULL OR ($7 AND r.lease_until < {NOW} AND r.lease_owner <> $5))
      AND r.domain <> ALL($3::text[])
      AND NOT EXISTS (SELECT 1 FROM paused p WHERE p.pool = r.pool
                      AND p.domain IN ('*', r.domain))
    ORDER BY {{order}} LIMIT $4
    FOR UPDATE OF r SKIP LOCKED)
UPDATE recipients r SET lease_owner = $5, lease_until = {NOW} + $6
FROM c WHERE r.msg_id = c.msg_id AND r.idx = c.idx
RETURNING r.{LOAD_COLS.replace(', ', ', r.')}"""
"""Lease the most urgent claimable rows of one state; {state} and {order} are filled in."""


class Leases:
    """Leases of a cluster's spool (a mixin of ``PostgresSpool``, which supplies
    ``acquire``, ``_load`` and ``work_channel``): ``claim`` hands a node the most urgent
    ready recipients of a pool (``SELECT ... FOR UPDATE SKIP LOCKED``, so two nodes never
    take the same row), ``reserve`` leases chosen ones, ``release`` gives them back."""

    if TYPE_CHECKING:  # supplied by PostgresSpool
        work_channel: str

        def acquire(self) -> AbstractAsyncContextManager[asyncpg.Connection]: ...

        async def _load(self, conn: asyncpg.Connection, rows: list) -> list[Recipient]: ...

    async def claim(self, owner: str, pool: str, limit: int, lease: float,
                    skip_domains: list[str] | None = None,
                    takeover: bool = True) -> list[Recipient]:
        """Lease up to ``limit`` ready recipients of ``pool``: due retries first, then new mail
        by (priority, deadline), skipping rows other nodes hold or are claiming right now, and
        rows ``owner`` itself holds (in its memory already, even if a stall let the lease lapse).
        With ``takeover`` false, rows whose lease lapsed are left to their owner too."""
        now_node = time.time()
        args = (pool, now_node, skip_domains or [], limit, owner, lease, takeover)
        async with self.acquire() as conn, conn.transaction():
            # retries that fell due first (their own index, ordered by due time), then new mail
            # by (priority, deadline): recipients deferred far ahead are in neither scan
            rows = await conn.fetch(_CLAIM.format(state="deferred", order="next_attempt"), *args)
            if len(rows) < limit:
                rows += await conn.fetch(_CLAIM.format(state="queued", order="priority, deadline"),
                                         *args[:3], limit - len(rows), *args[4:])
            return await self._load(conn, rows)

    async def reserve(self, owner: str, rcpts: list[Recipient], states: Sequence[State],
                      lease: float) -> list[Recipient]:
        """Lease to ``owner`` those of ``rcpts`` still in ``states`` that no other node holds,
        without changing their state; returns those. An operator's delete with a DSN: their
        final states follow once the DSN is queued, and a node that dies in between leaves them
        to be delivered after its lease, never bounced with the sender untold."""
        try:
            async with self.acquire() as conn:
                rows = await conn.fetch(
                    f"UPDATE recipients r SET lease_owner = $1, lease_until = {NOW} + $2"
                    " FROM unnest($3::text[], $4::int[]) AS k (msg_id, idx)"
                    " WHERE r.msg_id = k.msg_id AND r.idx = k.idx AND r.state = ANY($5::text[])"
                    " AND (r.lease_owner IS NULL OR r.lease_owner = $1) RETURNING r.msg_id, r.idx",
                    owner, lease, [r.msg.id for r in rcpts], [r.idx for r in rcpts],
                    [s.value for s in states])
        except UNREACHABLE as exc:
            raise SpoolUnavailable(f"the shared spool is unreachable: {exc}") from None
        got = {(r["msg_id"], r["idx"]) for r in rows}
        return [r for r in rcpts if (r.msg.id, r.idx) in got]

    async def release(self, owner: str) -> int:
        """Give back every lease ``owner`` holds, so other nodes take the work at once."""
        async with self.acquire() as conn:
            status = await conn.execute(
                "UPDATE recipients SET lease_owner = NULL, lease_until = NULL"
                " WHERE lease_owner = $1", owner)
            await conn.execute("SELECT pg_notify($1, '')", self.work_channel)
        return int(status.split()[-1])

    async def queue_summary(self) -> list[dict]:
        """Open recipients counted by pool, state, lease owner and whether the lease is current,
        with the earliest lease end of each group."""
        async with self.acquire() as conn:
            rows = await conn.fetch(
                "SELECT pool, state, lease_owner,"
                f" coalesce(lease_until >= {NOW}, false) AS held, count(*) AS n,"
                " min(lease_until) AS lease_until"
                " FROM recipients WHERE state IN ('queued', 'deferred', 'held')"
                " GROUP BY pool, state, lease_owner, held ORDER BY pool")
        return [dict(r) for r in rows]

    async def now(self) -> float:
        """The database's clock, which all lease and heartbeat times are measured by."""
        async with self.acquire() as conn:
            return await conn.fetchval(f"SELECT {NOW}")
