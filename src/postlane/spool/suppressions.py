"""The cluster's shared suppression list and complaint counts in PostgreSQL (schema 6).

Each node keeps its own SQLite copy of the list, so the look-up at RCPT never leaves the machine
(``feedback/shared_suppression.py``); what the nodes share is the order of the changes:
``suppression_changes`` (add, remove, and the hard bounces that are the evidence for repeated-
bounce suppression) numbered by one sequence, and ``suppressions``, the list those changes make,
from which a node that joins (or was away longer than the log is kept) copies the whole list.

Pushes take one advisory lock for their transaction, so sequence numbers are visible in commit
order: a node that has read up to ``seq`` never misses a smaller one committed later.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, NamedTuple

import asyncpg

from .pgsql import NOW

__all__ = ["SharedFeedback", "SuppressionChange"]


class SuppressionChange(NamedTuple):
    """One change of the list: ``op`` add | remove | bounce (``n`` is the sender's journal
    number when pushed, the shared sequence when read)."""

    n: int
    origin: str
    op: str
    address: str
    scope: str
    reason: str
    source: str
    created: float
    expires: float


_CHANGE_COLS = "seq AS n, origin, op, address, scope, reason, source, created, expires"


class SharedFeedback:
    """A mixin of ``PostgresSpool`` (which supplies ``acquire`` and ``schema``)."""

    if TYPE_CHECKING:
        schema: str

        def acquire(self) -> AbstractAsyncContextManager[asyncpg.Connection]: ...

    # -- suppression list -----------------------------------------------------------------------

    async def suppression_log(self) -> tuple[str, int]:
        """The log's identity (made with the schema: a node's copy synced with another
        cluster starts over) and the last sequence number trimmed from it."""
        async with self.acquire() as conn:
            row = await conn.fetchrow("SELECT cluster, trimmed FROM suppression_log")
        return row["cluster"], row["trimmed"]

    async def push_suppressions(self, origin: str, changes: Sequence[SuppressionChange]) -> int:
        """Append a node's changes (in its journal order) and apply them to the shared list, in
        one transaction; a change pushed before (same origin and number: the node stopped
        before it could forget it) is not applied twice. Returns how many were new."""
        if not changes:
            return 0
        cols = list(zip(*changes, strict=True))
        async with self.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                               f"postlane:{self.schema}:suppression")
            new: int = await conn.fetchval(
                f"""WITH new AS (
                    INSERT INTO suppression_changes (origin, origin_n, op, address, scope, reason,
                        source, created, expires, at)
                    SELECT $1, n, op, address, scope, reason, source, created, expires, {NOW}
                    FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
                        $7::text[], $8::float8[], $9::float8[])
                        WITH ORDINALITY AS c (n, op, address, scope, reason, source, created,
                                              expires, i)
                    ORDER BY i
                    ON CONFLICT (origin, origin_n) DO NOTHING
                    RETURNING seq, op, address, scope, reason, source, created, expires),
                last AS (
                    SELECT DISTINCT ON (address, scope) * FROM new WHERE op <> 'bounce'
                    ORDER BY address, scope, seq DESC),
                gone AS (
                    DELETE FROM suppressions s USING last l
                    WHERE l.op = 'remove' AND s.address = l.address AND s.scope = l.scope),
                put AS (
                    INSERT INTO suppressions
                        SELECT address, scope, reason, source, created, expires, seq FROM last
                        WHERE op = 'add'
                    ON CONFLICT (address, scope) DO UPDATE SET reason = EXCLUDED.reason,
                        source = EXCLUDED.source, created = EXCLUDED.created,
                        expires = EXCLUDED.expires, seq = EXCLUDED.seq)
                SELECT count(*) FROM new""",
                origin, *(list(c) for c in (cols[0], *cols[2:])))
        return new

    async def suppression_changes(self, after: int, limit: int) -> list[SuppressionChange]:
        """The changes after sequence number ``after``, in order."""
        async with self.acquire() as conn:
            rows = await conn.fetch(f"SELECT {_CHANGE_COLS} FROM suppression_changes"
                                    " WHERE seq > $1 ORDER BY seq LIMIT $2", after, limit)
        return [SuppressionChange(*r) for r in rows]

    async def suppression_snapshot(
            self, consume: Callable[[list[SuppressionChange]], Awaitable[None]],
            page: int) -> int:
        """Hand the whole shared list to ``consume``, ``page`` entries at a time, as "add"
        changes; returns the sequence number it is at (one snapshot: the list holds exactly
        the changes up to that number). Never all in memory: a list may have millions."""
        async with self.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                            readonly=True):
            seq = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM suppression_changes")
            seq = max(seq, await conn.fetchval("SELECT trimmed FROM suppression_log"))
            last = ("", "")
            while True:
                rows = await conn.fetch(
                    "SELECT seq, '' AS origin, 'add' AS op, address, scope, reason, source,"
                    " created, expires FROM suppressions WHERE (address, scope) > ($1, $2)"
                    " ORDER BY address, scope LIMIT $3", *last, page)
                if not rows:
                    return int(seq)
                await consume([SuppressionChange(*r) for r in rows])
                last = (rows[-1]["address"], rows[-1]["scope"])

    async def trim_suppressions(self, keep: float) -> int:
        """Forget changes older than ``keep`` seconds (the list keeps their effect): a node
        away longer copies the whole list when it comes back. Returns the rows deleted."""
        async with self.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                               f"postlane:{self.schema}:suppression")
            cut = await conn.fetchval("SELECT max(seq) FROM suppression_changes"
                                      f" WHERE at < {NOW} - $1::float8", keep)
            if cut is None:
                return 0
            status = await conn.execute("DELETE FROM suppression_changes WHERE seq <= $1", cut)
            await conn.execute("UPDATE suppression_log SET trimmed = greatest(trimmed, $1)", cut)
        return int(status.split()[-1])

    # -- complaint rates ------------------------------------------------------------------------

    async def put_complaint_counts(self, node: str,
                                   counts: Sequence[tuple[str, str, int, int]]) -> None:
        """This node's counts (pool, domain, delivered, complaints) since its start."""
        if not counts:
            return
        pools, domains, delivered, complaints = (list(c) for c in zip(*counts, strict=True))
        async with self.acquire() as conn:
            await conn.execute(
                """INSERT INTO complaint_counts (node, pool, domain, delivered, complaints)
                SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[])
                ON CONFLICT (node, pool, domain) DO UPDATE
                SET delivered = EXCLUDED.delivered, complaints = EXCLUDED.complaints""",
                node, pools, domains, delivered, complaints)

    async def clear_complaint_counts(self, node: str) -> None:
        """A node starting counts from nothing, as one node does."""
        async with self.acquire() as conn:
            await conn.execute("DELETE FROM complaint_counts WHERE node = $1", node)

    async def other_complaint_counts(self, node: str, dead_after: float
                                     ) -> list[tuple[str, str, int, int]]:
        """The counts of the other live nodes (heartbeat within ``dead_after``), summed per
        pool and domain: a node that died takes its counts with it, as a restart does."""
        async with self.acquire() as conn:
            rows = await conn.fetch(
                "SELECT c.pool, c.domain, sum(c.delivered)::bigint AS d,"
                " sum(c.complaints)::bigint AS f FROM complaint_counts c"
                " JOIN nodes n ON n.name = c.node WHERE c.node <> $1"
                f" AND n.heartbeat >= {NOW} - $2::float8 GROUP BY c.pool, c.domain",
                node, dead_after)
        return [(r["pool"], r["domain"], r["d"], r["f"]) for r in rows]
