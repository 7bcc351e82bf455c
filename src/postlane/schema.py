"""Versioned schemas of the embedded SQLite stores (the audit store, the suppression list).

Each store lists its migrations as ``(version, sql)``, never edited once released, and records
the versions applied in a table of its own (``<store>_migrations``), as the PostgreSQL stores
and the reputation store do. A store written before versions were recorded is recognised by its
tables (``baseline``). A store newer than this release is refused, not opened: a downgrade
would write rows the newer code cannot read. ``postlane upgrade --check`` reads the versions
without changing anything (``version``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

__all__ = ["DOWNGRADE_ADVICE", "Migrations", "NewerSchema", "columns", "migrate", "naming",
           "version"]

Migrations = Sequence[tuple[int, str]]

DOWNGRADE_ADVICE = ("install the release that wrote it, or restore the backup taken before the"
                    " upgrade (postlane upgrade --check)")


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """SQLite's errors do not say which file ("file is not a database"): a node opens four
    at start, so opening one names it in the error."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if str(path) in str(exc):
            raise
        raise type(exc)(f"{path}: {exc}") from exc


class NewerSchema(RuntimeError):
    """A store written by a newer Postlane (a downgrade): refused, never opened, because this
    release would write rows the newer code cannot read. ``serve`` says so in one line."""


def columns(conn: sqlite3.Connection, table: str) -> set[str]:
    """The columns of ``table`` (empty if there is no such table)."""
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def version(conn: sqlite3.Connection, table: str,
            baseline: Callable[[sqlite3.Connection], int]) -> int:
    """The store's schema version: the highest migration recorded in ``table``, else what
    ``baseline`` recognises (0: an empty database)."""
    if columns(conn, table):
        return conn.execute(f"SELECT coalesce(max(version), 0) FROM {table}").fetchone()[0]
    return baseline(conn)


def migrate(conn: sqlite3.Connection, path: str | Path, table: str, migrations: Migrations,
            baseline: Callable[[sqlite3.Connection], int]) -> list[int]:
    """Bring the store up to the last migration in one transaction (a second process opening
    it meanwhile waits, then finds it done); returns the versions applied."""
    latest = migrations[-1][0]
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = version(conn, table, baseline)
        if current > latest:
            raise NewerSchema(f"{path}: schema version {current} is newer than this Postlane"
                              f" ({latest})")
        conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER PRIMARY KEY,"
                     f" applied_at REAL NOT NULL)")
        now = time.time()
        conn.executemany(f"INSERT OR IGNORE INTO {table} VALUES (?, ?)",
                         [(v, now) for v, _ in migrations if v <= current])
        applied = []
        for number, sql in migrations:
            if number > current:
                # statement by statement: executescript would commit the transaction
                for statement in filter(str.strip, sql.split(";")):
                    conn.execute(statement)
                conn.execute(f"INSERT INTO {table} VALUES (?, ?)", (number, now))
                applied.append(number)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied
