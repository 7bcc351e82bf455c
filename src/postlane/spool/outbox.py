"""Reading the evidence outbox: the spool's events, for the recorder process.

The spool writes every accounting record as an event in the same transaction as the state
change it describes (``Spool`` in base.py); the recorder reads them back here, writer by writer
in number order, through a connection of its own (synchronous: the recorder is a plain process
without an event loop). Trimming stays with the spool's writer, so the spool has one writer.

A command that acts on a store without a node (``postlane suppress …``) puts the record of
its action into the outbox with ``post``, as a writer of its own: the recorder of a node feeds
it like any other (at once if one runs, else at the next start).

On PostgreSQL several nodes share the table. A node's spool holds a session advisory lock named
after its writer for as long as it lives; a recorder feeds its own node's writer, and takes over
any other writer whose lock it can get, i.e. whose node is gone (its connection closed), keeping
that lock while it works so that two survivors never feed the same events.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..accounting.records import pack
from ..secretfile import private_file
from .base import FINAL_STATES, new_writer_id

if TYPE_CHECKING:
    from ..accounting.records import Record

__all__ = ["Outbox", "PostgresOutbox", "SQLiteOutbox", "cluster_position", "open_outbox", "post",
           "writer_lock_key"]

_FINAL_SQL = f"({', '.join(sorted(repr(s.value) for s in FINAL_STATES))})"


def writer_lock_key(schema: str, writer: str) -> str:
    """The text whose ``hashtextextended`` is the advisory lock a live writer holds."""
    return f"postlane-writer:{schema}:{writer}"


class Outbox(Protocol):
    def writers(self) -> list[str]:
        """The writers whose events this recorder may feed now."""
        ...

    def read(self, writer: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` events of ``writer`` numbered after ``after``, in order."""
        ...

    def close(self) -> None: ...


class SQLiteOutbox:
    """The events of ``<directory>/spool.sqlite`` (one node: every writer is this node's)."""

    def __init__(self, directory: str | Path) -> None:
        path = Path(directory) / "spool.sqlite"
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA query_only = 1")

    def writers(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT writer FROM writers ORDER BY started")]

    def read(self, writer: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        return self.db.execute("SELECT n, data FROM events WHERE writer = ? AND n > ?"
                               " ORDER BY n LIMIT ?", (writer, after, limit)).fetchall()

    # what ``audit verify`` compares the trail with (``completeness.SpoolView``)
    all_writers = writers

    def open_recipients(self) -> set[tuple[str, str]]:
        return {(m, a.lower()) for m, a in self.db.execute(
            f"SELECT msg_id, address FROM recipients WHERE state NOT IN {_FINAL_SQL}")}

    def messages(self) -> set[str]:
        return {m for (m,) in self.db.execute("SELECT id FROM messages")}

    def close(self) -> None:
        self.db.close()


class PostgresOutbox:
    """The events of a cluster schema: this node's writer, and writers of nodes that are gone."""

    def __init__(self, dsn: str, schema: str, own: str, dead_after: float = 0.0) -> None:
        import psycopg  # only where a cluster runs

        from .pgsql import NOW

        self.schema, self.own = schema, own
        self._listed = ("SELECT w.writer, w.node = %s OR NOT EXISTS (SELECT 1 FROM nodes n"
                        f" WHERE n.name = w.node AND n.heartbeat >= {NOW} - %s)"
                        " FROM writers w ORDER BY w.started")
        self.dead_after = dead_after
        """Another node's writer is adopted only once that node's heartbeat is this old: a node
        restarted meanwhile adopts its own (its files' position says exactly where they got to;
        the cluster's published ``filed`` may be a sync behind: lines written twice)."""
        self._held: set[str] = set()
        self.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5,
                                    application_name=f"postlane-recorder/{schema}")
        self.conn.execute(f'SET search_path TO "{schema}"')

    def writers(self) -> list[str]:
        out = []
        rows = self.conn.execute(self._listed, (self.own.rsplit("/", 1)[0],
                                                self.dead_after)).fetchall()
        listed = [w for w, _ in rows]
        for writer in self._held - set(listed):  # trimmed to nothing and forgotten
            self.release(writer)
        for writer, adoptable in rows:
            if writer == self.own or writer in self._held or (adoptable
                                                               and self._try_lock(writer)):
                if writer != self.own:
                    self._held.add(writer)
                out.append(writer)
        return out

    def _try_lock(self, writer: str) -> bool:
        """Take the advisory lock that makes this recorder the one feeding ``writer``."""
        row = self.conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                                (writer_lock_key(self.schema, writer),)).fetchone()
        if row is None:  # a SELECT of one function call returns one row
            raise RuntimeError(f"pg_try_advisory_lock returned no row for writer {writer}")
        return bool(row[0])

    def read(self, writer: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        return [(n, bytes(data)) for n, data in self.conn.execute(
            "SELECT n, data FROM events WHERE writer = %s AND n > %s ORDER BY n LIMIT %s",
            (writer, after, limit))]

    def all_writers(self) -> list[str]:
        return [w for (w,) in self.conn.execute("SELECT writer FROM writers")]

    def open_recipients(self) -> set[tuple[str, str]]:
        return {(m, a.lower()) for m, a in self.conn.execute(
            f"SELECT msg_id, address FROM recipients WHERE state NOT IN {_FINAL_SQL}")}

    def messages(self) -> set[str]:
        return {m for (m,) in self.conn.execute("SELECT id FROM messages")}

    def filed(self, writer: str) -> int:
        """The last event of ``writer`` its own recorder has in (fsynced) accounting files: an
        adopted writer's events go on from there, not again from its first."""
        row = self.conn.execute("SELECT filed FROM writers WHERE writer = %s",
                                (writer,)).fetchone()
        return row[0] if row else 0

    def commit_position(self, node: str, position: dict) -> None:
        """Make ``position`` (the node's accounting position, see ``AccountingLog``) the
        cluster's word on its files, with each writer's ``filed`` from its ``feed``, in one
        transaction: called after the files' fsync and before the position file. An adopter
        goes on from ``filed``, and a reader of the node's files (its own restart, ``audit
        verify --files``) trusts the position this table or the file holds, whichever is
        newer: the two never disagree about which lines the files have."""
        from psycopg.types.json import Jsonb

        feed = position.get("feed", {})
        with self.conn.transaction():
            self.conn.execute(
                "UPDATE writers w SET filed = v.n FROM (SELECT unnest(%s::text[]) AS writer,"
                " unnest(%s::bigint[]) AS n) v WHERE w.writer = v.writer AND w.filed < v.n",
                (list(feed), list(feed.values())))
            self.conn.execute(
                "INSERT INTO acct_positions (node, gen, position, at) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (node) DO UPDATE SET gen = excluded.gen, position ="
                " excluded.position, at = excluded.at WHERE acct_positions.gen < excluded.gen",
                (node, int(position.get("gen", 0)), Jsonb(position), time.time()))

    def position(self, node: str) -> dict | None:
        """The accounting position the cluster holds for ``node`` (``commit_position``)."""
        return _position_row(self.conn, node)

    def release(self, writer: str) -> None:
        """Stop feeding an adopted writer (all its events are consumed, and nobody writes
        more: its node is gone)."""
        if writer in self._held:
            self._held.discard(writer)
            self.conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))",
                              (writer_lock_key(self.schema, writer),))

    def close(self) -> None:
        self.conn.close()


def _position_row(conn, node: str) -> dict | None:
    import psycopg

    try:
        with conn.transaction():  # a schema from before migration 13: no such table
            row = conn.execute("SELECT position FROM acct_positions WHERE node = %s",
                               (node,)).fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return row[0] if row else None


def cluster_position(spool: str, schema: str, node: str) -> dict | None:
    """The accounting position a cluster's database holds for ``node`` (None on one node, or
    none committed yet): what a reader of that node's files passes to ``read_position``."""
    if not spool.startswith(("postgresql://", "postgres://")):
        return None
    import psycopg

    with psycopg.connect(spool, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        return _position_row(conn, node)


def open_outbox(spool: str, schema: str, own: str,
                dead_after: float = 0.0) -> SQLiteOutbox | PostgresOutbox:
    """The outbox of the spool at ``spool`` (``node.spool``: a folder or a DSN)."""
    if spool.startswith(("postgresql://", "postgres://")):
        return PostgresOutbox(spool, schema, own, dead_after)
    return SQLiteOutbox(spool)


def post(spool: str, schema: str, node: str, events: Sequence[Record]) -> str:
    """Commit ``events`` to the outbox of the spool at ``spool`` as a new writer (named after
    ``node``), numbered from 1, in one transaction; returns the writer. No advisory lock is
    held for it, so on PostgreSQL any node's recorder adopts it."""
    writer = new_writer_id(node)
    rows = [(writer, n, pack(rec)) for n, rec in enumerate(events, 1)]
    if spool.startswith(("postgresql://", "postgres://")):
        import psycopg

        with psycopg.connect(spool, connect_timeout=5) as conn:  # one transaction
            conn.execute(f'SET search_path TO "{schema}"')
            conn.execute("INSERT INTO writers VALUES (%s, %s, %s)", (writer, node, time.time()))
            conn.cursor().executemany("INSERT INTO events VALUES (%s, %s, %s)", rows)
        return writer
    from .sqlite import _connect, migrate

    path = private_file(Path(spool) / "spool.sqlite")
    lite = _connect(path)
    try:
        migrate(lite, path)
        lite.execute("BEGIN IMMEDIATE")
        lite.execute("INSERT INTO writers VALUES (?, ?, ?)", (writer, node, time.time()))
        lite.executemany("INSERT INTO events VALUES (?, ?, ?)", rows)
        lite.execute("COMMIT")
    finally:
        lite.close()
    return writer
