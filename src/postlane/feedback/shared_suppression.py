"""One suppression list for a cluster: every node's SQLite copy follows the shared change log.

The look-up at RCPT stays a local SQLite query (``suppression.py``); what changes in a cluster
is how the copy is kept. At a node's first start on a cluster, triggers are added to its list:
from then on every write - the node's bounces, complaints, unsubscribes and operator changes,
and ``postlane suppress add|remove|import`` run on the file by the CLI, node up or not - also
writes a row to ``suppression_journal``. Each second (``TICK``) the node pushes its journal to
the shared ``suppression_changes`` log (``spool/suppressions.py``) and applies, in the log's
order, every change it has not seen (its own included, so two nodes' changes to one address
end the same way on both). At start it does the same before opening its listeners; a node new to
the cluster first pushes every entry it had, then copies the whole shared list.

A change of this node not yet pushed wins over an older one from the log for the same address
and scope (it will be pushed, and so be later in the log). Bounce evidence (the ``bounces``
table behind repeated-evidence suppression) is shared too, so the ``suppress_after`` bounces
may arrive at different nodes. Without a cluster none of this exists: the file is not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..spool.pgsql import UNREACHABLE
from ..spool.suppressions import SuppressionChange
from .suppression_writer import SuppressionWriter

if TYPE_CHECKING:
    from ..spool import PostgresSpool

__all__ = ["SuppressionSync"]

log = logging.getLogger("postlane.cluster")
T = TypeVar("T")

TICK = 1.0
"""Seconds between two syncs of a node's list with the cluster's."""
PAGE = 5000
"""Changes pushed or applied per transaction."""
KEEP = 30 * 86400.0
"""Seconds the shared log keeps a change; a node away longer copies the whole list again."""
TRIM_EVERY = 3600.0

_JOURNAL = (
    """CREATE TABLE IF NOT EXISTS suppression_journal (
    n INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, address TEXT NOT NULL,
    scope TEXT NOT NULL, reason TEXT NOT NULL, source TEXT NOT NULL, created REAL NOT NULL,
    expires REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS suppression_sync (
    id INTEGER PRIMARY KEY CHECK (id = 1), cluster TEXT NOT NULL, origin TEXT NOT NULL,
    applied INTEGER NOT NULL, applying INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TRIGGER IF NOT EXISTS suppression_journal_add AFTER INSERT ON suppression
WHEN coalesce((SELECT applying FROM suppression_sync), 0) = 0 BEGIN
    INSERT INTO suppression_journal (op, address, scope, reason, source, created, expires)
    VALUES ('add', NEW.address, NEW.scope, NEW.reason, NEW.source, NEW.created, NEW.expires);
END""",
    """CREATE TRIGGER IF NOT EXISTS suppression_journal_update AFTER UPDATE ON suppression
WHEN coalesce((SELECT applying FROM suppression_sync), 0) = 0 BEGIN
    INSERT INTO suppression_journal (op, address, scope, reason, source, created, expires)
    SELECT 'remove', OLD.address, OLD.scope, '', '', 0, 0
    WHERE OLD.address <> NEW.address OR OLD.scope <> NEW.scope;
    INSERT INTO suppression_journal (op, address, scope, reason, source, created, expires)
    VALUES ('add', NEW.address, NEW.scope, NEW.reason, NEW.source, NEW.created, NEW.expires);
END""",
    """CREATE TRIGGER IF NOT EXISTS suppression_journal_remove AFTER DELETE ON suppression
WHEN coalesce((SELECT applying FROM suppression_sync), 0) = 0 BEGIN
    INSERT INTO suppression_journal (op, address, scope, reason, source, created, expires)
    VALUES ('remove', OLD.address, OLD.scope, '', '', 0, 0);
END""",
    # a bounce's message rides in ``source`` (one message's bounce counts once on every node);
    # made again at each start, as lists journaled before the column had the trigger without
    "DROP TRIGGER IF EXISTS suppression_journal_bounce",
    """CREATE TRIGGER suppression_journal_bounce AFTER INSERT ON bounces
WHEN coalesce((SELECT applying FROM suppression_sync), 0) = 0 BEGIN
    INSERT INTO suppression_journal (op, address, scope, reason, source, created, expires)
    VALUES ('bounce', NEW.address, '', NEW.detail, NEW.queue_id, NEW.time, 0);
END""",
)
"""What a node's list gets at its first cluster start (``join``): the journal of its changes
and how far it has applied the shared log. The triggers write the journal whoever writes the
list, except while ``applying`` (changes that came from the log)."""


def join(conn: sqlite3.Connection, cluster: str) -> tuple[str, int]:
    """Make the list follow cluster ``cluster``: (this copy's origin name, the last sequence
    number applied, -1 before the first copy of the shared list). A list new to this cluster
    journals every entry and bounce it has, to be pushed; a node that moves to another cluster
    starts over."""
    for statement in _JOURNAL:
        conn.execute(statement)
    row = conn.execute("SELECT cluster, origin, applied FROM suppression_sync").fetchone()
    if row is not None and row[0] == cluster:
        return row[1], row[2]
    origin = secrets.token_hex(8)
    conn.execute("DELETE FROM suppression_journal")
    conn.execute("INSERT OR REPLACE INTO suppression_sync VALUES (1, ?, ?, -1, 0)",
                 (cluster, origin))
    conn.execute("INSERT INTO suppression_journal (op, address, scope, reason, source, created,"
                 " expires) SELECT 'add', address, scope, reason, source, created, expires"
                 " FROM suppression ORDER BY address, scope")
    conn.execute("INSERT INTO suppression_journal (op, address, scope, reason, source, created,"
                 " expires) SELECT 'bounce', address, '', detail, queue_id, time, 0"
                 " FROM bounces")
    return origin, -1


def journal(conn: sqlite3.Connection, origin: str, limit: int) -> list[SuppressionChange]:
    """The oldest changes not yet pushed."""
    return [SuppressionChange(r[0], origin, *r[1:]) for r in conn.execute(
        "SELECT n, op, address, scope, reason, source, created, expires FROM suppression_journal"
        " ORDER BY n LIMIT ?", (limit,))]


def pushed(conn: sqlite3.Connection, upto: int) -> None:
    """Forget the journal up to ``upto``: those changes are in the shared log."""
    conn.execute("DELETE FROM suppression_journal WHERE n <= ?", (upto,))


def _pending(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """The addresses and scopes this node changed and has not pushed yet (the journal is
    short: it is pushed each second; no index, so an import's rows cost one insert each)."""
    return set(conn.execute("SELECT DISTINCT address, scope FROM suppression_journal"
                            " WHERE op <> 'bounce'").fetchall())


def apply(conn: sqlite3.Connection, origin: str, changes: Sequence[SuppressionChange],
          upto: int) -> None:
    """Apply changes from the shared log, in its order, and note ``upto`` as applied."""
    conn.execute("UPDATE suppression_sync SET applying = 1")
    pending = _pending(conn)
    for c in changes:
        if c.op == "bounce":
            if c.origin != origin:  # our own is in the table already; a message's once
                conn.execute("INSERT OR IGNORE INTO bounces (address, time, detail, queue_id)"
                             " VALUES (?, ?, ?, ?)", (c.address, c.created, c.reason, c.source))
        elif (c.address, c.scope) in pending:
            continue  # our later change to it wins (it goes into the log after this one)
        elif c.op == "add":
            conn.execute("INSERT OR REPLACE INTO suppression VALUES (?,?,?,?,?,?)",
                         (c.address, c.scope, c.reason, c.source, c.created, c.expires))
        elif c.op == "remove":
            conn.execute("DELETE FROM suppression WHERE address = ? AND scope = ?",
                         (c.address, c.scope))
    conn.execute("UPDATE suppression_sync SET applying = 0, applied = ?", (upto,))


def stage(conn: sqlite3.Connection, entries: Sequence[SuppressionChange], first: bool) -> None:
    """Copy a page of the shared list aside (``replace`` swaps it in at once). The table is
    TEMP, this connection's own: two nodes sharing one state folder (one machine) dropped each
    other's, and the node whose ``replace`` found none retried it for ever at its start."""
    if first:
        conn.execute("DROP TABLE IF EXISTS temp.suppression_staging")
        conn.execute("CREATE TEMP TABLE suppression_staging (address TEXT NOT NULL, scope TEXT NOT"
                     " NULL, reason TEXT NOT NULL, source TEXT NOT NULL, created REAL NOT NULL,"
                     " expires REAL NOT NULL, PRIMARY KEY (address, scope)) WITHOUT ROWID")
    conn.executemany("INSERT OR REPLACE INTO suppression_staging VALUES (?,?,?,?,?,?)",
                     [(e.address, e.scope, e.reason, e.source, e.created, e.expires)
                      for e in entries])


def replace(conn: sqlite3.Connection, upto: int) -> None:
    """Make the list the shared one copied aside (a node new to the cluster, or away longer
    than the log is kept), keeping this node's changes not yet pushed; in one transaction, so
    a look-up never sees half of it."""
    conn.execute("UPDATE suppression_sync SET applying = 1")
    mine = "SELECT address, scope FROM suppression_journal WHERE op <> 'bounce'"
    conn.execute(f"DELETE FROM suppression WHERE (address, scope) NOT IN ({mine})")
    conn.execute("INSERT OR IGNORE INTO suppression SELECT * FROM suppression_staging"
                 f" WHERE (address, scope) NOT IN ({mine})")
    conn.execute("DROP TABLE temp.suppression_staging")
    conn.execute("UPDATE suppression_sync SET applying = 0, applied = ?", (upto,))


class SuppressionSync:
    """Keeps a cluster node's list one with the cluster's (see the module's docstring). Its
    SQLite work goes through the node's suppression writer thread (after every write submitted
    before it, never on the event loop)."""

    def __init__(self, spool: PostgresSpool, writes: SuppressionWriter) -> None:
        self.spool = spool
        self.writes = writes
        self.store = writes.store
        self.origin = ""
        self.applied = -1
        self.pushed = 0
        """Changes this node put into the shared log (since its start)."""
        self._task: asyncio.Task | None = None
        self._failing = False
        self._trimmed = 0.0

    async def start(self) -> None:
        """Join the cluster's list and catch up with it (raises if the database is away: the
        node does not start with a list it cannot know is current)."""
        cluster, trimmed = await self.spool.suppression_log()
        self.origin, self.applied = await self.writes.call(self._write, join, cluster)
        await self.sync(trimmed)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop syncing; push what this node changed last (if the database answers)."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        try:
            await asyncio.wait_for(self._push(), 5.0)
        except Exception as exc:  # noqa: BLE001 - kept in the journal, pushed at the next start
            log.warning("suppression changes not pushed at the stop (%s: %s): they are at the"
                        " next start", type(exc).__name__, exc)

    async def sync(self, trimmed: int | None = None) -> None:
        """Push this node's changes, then apply the log's new ones (the whole list instead when
        this copy has never synced, or the log no longer goes back to where it stopped)."""
        await self._push()
        if trimmed is None:
            trimmed = (await self.spool.suppression_log())[1]
        if self.applied < 0 or self.applied < trimmed:
            copied = 0

            async def consume(entries: list[SuppressionChange]) -> None:
                nonlocal copied
                await self.writes.call(self._write, stage, entries, copied == 0)
                copied += len(entries)

            upto = await self.spool.suppression_snapshot(consume, PAGE)
            if copied == 0:
                await self.writes.call(self._write, stage, [], True)
            await self.writes.call(self._write, replace, upto)
            self.applied = upto
            log.info("suppression list copied from the cluster", extra={"entries": copied})
        while True:
            changes = await self.spool.suppression_changes(self.applied, PAGE)
            if not changes:
                return
            await self.writes.call(self._write, apply, self.origin, changes, changes[-1].n)
            self.applied = changes[-1].n
            if len(changes) < PAGE:
                return

    async def _push(self) -> None:
        while True:
            changes = await self.writes.call(self._write, journal, self.origin, PAGE)
            if not changes:
                return
            self.pushed += await self.spool.push_suppressions(self.origin, changes)
            await self.writes.call(self._write, pushed, changes[-1].n)
            if len(changes) < PAGE:
                return

    def _write(self, fn: Callable[..., T], *args: Any, patience: float | None = -1.0) -> T:
        """``fn(connection, *args)`` in one write transaction of the list (in the writer
        thread: after every write submitted before it)."""
        return self.store.write(lambda conn: fn(conn, *args), patience)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.sync()
                if time.monotonic() - self._trimmed >= TRIM_EVERY:
                    self._trimmed = time.monotonic()
                    await self.spool.trim_suppressions(KEEP)
            except Exception as exc:  # told once per outage; the next tick tries again
                if not self._failing:
                    self._failing = True
                    log.warning("suppression list not synced with the cluster (%s: %s): this"
                                " node checks its own copy and tries again every %gs",
                                type(exc).__name__, exc, TICK,
                                exc_info=not isinstance(exc, (*UNREACHABLE, RuntimeError)))
                continue
            if self._failing:
                self._failing = False
                log.info("suppression list synced with the cluster again")
