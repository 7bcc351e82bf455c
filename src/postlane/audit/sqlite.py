"""The embedded audit store: one SQLite file in WAL mode, one node appends (``SQLiteAuditStore``),
with its versioned schema (``MIGRATIONS``, ``baseline``)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .. import schema
from ..accounting.records import Record
from ..secretfile import private_file
from .chain import GENESIS, VERIFY_COLUMNS
from .completeness import Completeness, SpoolView, check
from .linking import fresh, link, prepare, walk
from .queries import (
    CLASSES_SQL,
    SEAL_COLS,
    between_where,
    find_sql,
    pause_spans,
    pauses_sql,
    rcpt_key,
    records_of,
    row_at,
    seal_from_row,
    seal_row,
)
from .retention import RetentionMixin
from .seal import Seal
from .store import COLUMNS, Entry, Query, StoreMissing, StoreOutdated, VerifyResult

__all__ = ["MIGRATIONS", "SQLiteAuditStore", "baseline"]

#: Versioned schema (table ``audit_migrations``; ``schema.migrate``): append ``(n + 1, sql)``,
#: never edit a released entry. 1 is the store of hash scheme 1; 2 adds the columns of scheme 2
#: (old rows keep NULL there and verify as scheme 1), the lookup keys on every record (they
#: covered "r" rows only) and each record's spool event (unique: an event is chained once,
#: whatever replays a crash causes); 3 the day seals (Ed25519 signatures, time-stamps); 4 the
#: index of operators' actions; 5 the recipient's look-up key (``store.KEY_COLUMNS``), filled
#: in for the rows already there, and its index in place of the NOCASE one (NOCASE folds ASCII
#: only: ``JÖRG@…`` was not found as ``jörg@…``). The columns are those of ``COLUMNS`` (a test
#: checks).
MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE audit_records (seq INTEGER PRIMARY KEY, day TEXT NOT NULL, prev BLOB NOT NULL,
    hash BLOB NOT NULL, state INTEGER NOT NULL, nonce BLOB, pdigest BLOB, cdigest BLOB,
    type TEXT, time_logged REAL, time_queued REAL, orig TEXT, rcpt TEXT, queue_id TEXT,
    cls TEXT, vmta_pool TEXT, orcpt TEXT, dsn_action TEXT, dsn_status TEXT, dsn_diag TEXT,
    dsn_mta TEXT, bounce_cat TEXT, src_type TEXT, src_mta TEXT, dlv_source_ip TEXT,
    dlv_destination_ip TEXT, dlv_tls_protocol TEXT, dlv_tls_cipher TEXT, dlv_size INTEGER,
    vmta TEXT, job_id TEXT, env_id TEXT, correlation_id TEXT, message_id TEXT, attempt INTEGER,
    total_seconds_queued REAL, listener TEXT, auth_user TEXT, sla REAL);
CREATE TABLE audit_days (day TEXT PRIMARY KEY, first_seq INTEGER, last_seq INTEGER,
    records INTEGER, anchor BLOB, head BLOB);
CREATE TABLE audit_cursors (name TEXT PRIMARY KEY, seq INTEGER, updated REAL);
CREATE TABLE audit_operations (id INTEGER PRIMARY KEY, time REAL, action TEXT, pool TEXT,
    domain TEXT);
CREATE TABLE audit_purges (id INTEGER PRIMARY KEY, time REAL, cls TEXT, action TEXT,
    cutoff REAL, rows INTEGER);
CREATE TABLE audit_writers (writer TEXT PRIMARY KEY, batch INTEGER, last_seq INTEGER,
    time REAL);
CREATE INDEX ar_queue ON audit_records (queue_id);
CREATE INDEX ar_time ON audit_records (time_logged);
CREATE INDEX ar_msgid ON audit_records (message_id) WHERE type = 'r';
CREATE INDEX ar_corr ON audit_records (correlation_id) WHERE type = 'r';
CREATE INDEX ar_envid ON audit_records (env_id) WHERE type = 'r' AND env_id <> '';
CREATE INDEX ar_rcpt ON audit_records (rcpt COLLATE NOCASE) WHERE type = 'r';
CREATE INDEX ar_cls ON audit_records (cls, time_queued) WHERE type = 'r';
CREATE INDEX ar_pool ON audit_records (vmta_pool, time_queued) WHERE type = 'r';
"""),
    (2, """
ALTER TABLE audit_records ADD COLUMN scheme INTEGER;
ALTER TABLE audit_records ADD COLUMN dlv_tls_auth TEXT;
ALTER TABLE audit_records ADD COLUMN dlv_tls_policy TEXT;
ALTER TABLE audit_records ADD COLUMN operator TEXT;
ALTER TABLE audit_records ADD COLUMN ev_writer TEXT;
ALTER TABLE audit_records ADD COLUMN ev_n INTEGER;
DROP INDEX ar_msgid;
DROP INDEX ar_corr;
DROP INDEX ar_envid;
DROP INDEX ar_rcpt;
CREATE INDEX ax_msgid ON audit_records (message_id);
CREATE INDEX ax_corr ON audit_records (correlation_id);
CREATE INDEX ax_envid ON audit_records (env_id) WHERE env_id <> '';
CREATE INDEX ax_rcpt ON audit_records (rcpt COLLATE NOCASE);
CREATE UNIQUE INDEX ax_event ON audit_records (ev_writer, ev_n) WHERE ev_writer IS NOT NULL;
CREATE TABLE audit_feed (writer TEXT PRIMARY KEY, n INTEGER, time REAL);
DROP TABLE audit_writers;
"""),
    (3, """
CREATE TABLE audit_seals (day TEXT NOT NULL, last_seq INTEGER NOT NULL,
    records INTEGER NOT NULL, head BLOB NOT NULL, sealed_at REAL NOT NULL,
    key_id TEXT NOT NULL, signature BLOB NOT NULL, tsa BLOB, PRIMARY KEY (day, last_seq));
"""),
    (4, """
CREATE INDEX ax_ops ON audit_records (vmta_pool, time_logged) WHERE type = 'o';
"""),
    (5, """
ALTER TABLE audit_records ADD COLUMN rcpt_key TEXT;
UPDATE audit_records SET rcpt_key = postlane_rcpt_key(rcpt) WHERE rcpt IS NOT NULL AND rcpt <> '';
DROP INDEX ax_rcpt;
CREATE INDEX ax_rcpt_key ON audit_records (rcpt_key);
"""),
]


def baseline(conn: sqlite3.Connection) -> int:
    """The version of a store written before versions were recorded (0: none yet)."""
    have = schema.columns(conn, "audit_records")
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'ax_ops'").fetchone():
        return 4
    if schema.columns(conn, "audit_seals"):
        return 3
    return 0 if not have else 2 if "ev_n" in have else 1


class SQLiteAuditStore(RetentionMixin):
    """The embedded audit store. One thread at a time per instance (asyncio.to_thread is fine:
    calls are sequential)."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise StoreMissing(f"no audit store at {self.path}")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                      isolation_level=None, timeout=30,
                                      check_same_thread=False)
            found, latest = schema.version(self.db, "audit_migrations", baseline), \
                MIGRATIONS[-1][0]
            if found < latest:
                self.db.close()
                raise StoreOutdated(f"the audit store at {self.path} is at schema version"
                                    f" {found} of {latest}: start the node on it, or run"
                                    f" `postlane upgrade`, first")
        else:
            private_file(self.path)  # evidence holds addresses: 0600 in a 0700 folder
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30,
                                      check_same_thread=False)
            # migration 5 fills in the look-up key of the rows already there
            self.db.create_function("postlane_rcpt_key", 1, rcpt_key, deterministic=True)
            with schema.naming(self.path):
                self.db.execute("PRAGMA journal_mode=WAL")
                # FULL: a commit is on disk when it returns. The node trims the spool's events
                # once the store has committed them; under NORMAL a power loss took the last
                # commits back after their events were gone from the spool, and the records
                # with them. One fsync per recorder batch, in the recorder process.
                self.db.execute("PRAGMA synchronous=FULL")
                self._create()
        self.db.row_factory = sqlite3.Row

    def _create(self) -> None:
        schema.migrate(self.db, self.path, "audit_migrations", MIGRATIONS, baseline)

    def close(self) -> None:
        self.db.close()

    # -- writing ----------------------------------------------------------------------------

    def _load_tail(self) -> tuple[int, bytes, str]:
        row = self.db.execute(
            "SELECT seq, hash, day FROM audit_records ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[0], bytes(row[1]), row[2]) if row else (0, GENESIS, "")

    def feed_cursors(self) -> dict[str, int]:
        return {w: n for w, n in self.db.execute("SELECT writer, n FROM audit_feed")}

    def query(self, sql: str, args: Iterable = ()) -> list[tuple]:
        return [tuple(r) for r in self.db.execute(sql, tuple(args))]

    # -- seals ------------------------------------------------------------------------------

    def seals(self) -> list[Seal]:
        return [seal_from_row(r)
                for r in self.query(f"SELECT {SEAL_COLS} FROM audit_seals ORDER BY day,"
                                    " last_seq")]

    def add_seal(self, seal: Seal) -> None:
        self.db.execute(f"INSERT INTO audit_seals ({SEAL_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        seal_row(seal))

    def records_of(self, writer: str, first: int, last: int) -> list[tuple[int, Record]]:
        """See ``queries.records_of``."""
        return records_of(self, "?", writer, first, last)

    def row_at(self, seq: int) -> tuple | None:
        """(hash, day, records of that day up to it) of record ``seq``, for seal checks."""
        return row_at(self, "?", seq)

    def completeness(self, spool: SpoolView | None = None,
                     filed: dict[str, int] | None = None) -> Completeness:
        """See ``completeness.check``."""
        return check(self, "?", self.feed_cursors(), spool, filed)

    def append(self, batch: Sequence[Entry]) -> int:
        """Chain and insert records (with their class SLA) in one transaction; returns the
        last seq. The tail is read inside the write transaction (``BEGIN IMMEDIATE`` holds the
        file's write lock), so two writers on one file still make one chain. Events the store
        holds already are skipped (see ``Entry``)."""
        prepared = prepare(batch)  # the hashing, before taking the lock
        marks = f"({', '.join('?' * len(COLUMNS))})"
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            prepared, cursors = fresh(prepared, self.feed_cursors())
            tail = self._load_tail()
            if prepared:
                rows, days, tail = link(prepared, tail)
                # executemany, not multi-row INSERTs: those compile a new statement for each
                # batch size and measured worse in the campaign bench (node CPU +0.3 ms per
                # message, RSS +17 MB)
                db.executemany(f"INSERT INTO audit_records ({', '.join(COLUMNS)}) VALUES"
                               f" {marks}", rows)
                db.executemany(
                    "INSERT INTO audit_days (day, first_seq, last_seq, records, anchor, head) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(day) DO UPDATE SET "
                    "last_seq = excluded.last_seq, records = records + excluded.records, "
                    "head = excluded.head", [(d, *s) for d, s in days.items()])
                now = time.time()
                db.executemany("INSERT OR REPLACE INTO audit_feed VALUES (?, ?, ?)",
                               [(w, n, now) for w, n in cursors.items()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return tail[0]

    # -- reading ----------------------------------------------------------------------------

    def find(self, query: Query) -> list[dict]:
        """Every record of the messages matching the keys (a recipient key keeps only that
        recipient's records), in chain order."""
        sql, args = find_sql(query, "?")
        return [dict(r) for r in self.db.execute(sql + " ORDER BY seq", args)]

    def rows_between(self, since: float | None, until: float | None,
                     cls: str | None = None) -> Iterator[dict]:
        """Records logged in [since, until), optionally of one class, in chain order."""
        where, args = between_where(since, until, cls, "?")
        for row in self.db.execute(
                f"SELECT * FROM audit_records WHERE {where} ORDER BY seq", args):
            yield dict(row)

    def rows_after(self, seq: int, types: Sequence[str], classes: Sequence[str],
                   limit: int) -> tuple[list[dict], int]:
        """Up to ``limit`` records after ``seq`` that pass the filters, and the seq the caller
        may move its cursor to once they are delivered (past filtered-out records too)."""
        where = ["seq > ?"]
        args: list[int | str] = [seq]
        if types:
            where.append(f"type IN ({', '.join('?' * len(types))})")
            args.extend(types)
        if classes:
            where.append(f"cls IN ({', '.join('?' * len(classes))})")
            args.extend(classes)
        db = self.db
        db.execute("BEGIN")  # one snapshot for both statements
        try:
            top = db.execute("SELECT coalesce(max(seq), 0) FROM audit_records").fetchone()[0]
            rows = [dict(r) for r in db.execute(
                f"SELECT * FROM audit_records WHERE {' AND '.join(where)} AND seq <= ? "
                "ORDER BY seq LIMIT ?", [*args, top, limit])]
        finally:
            db.execute("COMMIT")
        if len(rows) == limit:
            return rows, rows[-1]["seq"]
        return rows, max(top, seq)

    def days(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM audit_days ORDER BY day")]

    def purges(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM audit_purges ORDER BY id")]

    def pauses(self, pool: str, until: float) -> list[tuple[float, float, str]]:
        """(start, end, domain) of each pause of ``pool`` begun before ``until``; an open pause
        ends at ``until``."""
        return pause_spans(self.db.execute(pauses_sql("?"), (pool, until) * 2), until)

    def classes(self) -> list[str]:
        return [r[0] for r in self.db.execute(CLASSES_SQL)]

    # -- verification -----------------------------------------------------------------------

    def seqs_with_hash(self, digest: bytes) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT seq FROM audit_records WHERE hash = ?",
                                              (digest,))]

    def seqs_linking_to(self, digest: bytes) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT seq FROM audit_records WHERE prev = ?",
                                              (digest,))]

    def verify(self, since_day: str | None = None) -> VerifyResult:
        """Walk the chain (from the start of ``since_day``) and check every day's seal, in one
        read transaction: a batch the node commits meanwhile must not look inserted."""
        self.db.execute("BEGIN")
        try:
            return walk(self, self.days(), since_day, self._verify_rows)
        finally:
            self.db.execute("COMMIT")

    def _verify_rows(self, start_seq: int) -> Iterator[tuple]:
        cursor = self.db.cursor()
        cursor.row_factory = None  # plain tuples in VERIFY_COLUMNS order, then the day
        try:
            yield from cursor.execute(f"SELECT {', '.join(VERIFY_COLUMNS)}, day FROM "
                                      "audit_records WHERE seq >= ? ORDER BY seq", (start_seq,))
        finally:
            cursor.close()

    # -- retention (RetentionMixin) ------------------------------------------------------------

    def _candidates(self, cls: str, cutoff: float, states: tuple[int, ...], after: int,
                    limit: int) -> list[dict]:
        marks = ", ".join("?" * len(states))
        return [dict(r) for r in self.db.execute(
            f"SELECT * FROM audit_records WHERE cls = ? AND time_queued < ? AND "
            f"state IN ({marks}) AND seq > ? ORDER BY seq LIMIT ?",
            (cls, cutoff, *states, after, limit))]

    def _write_changes(self, updates: list[tuple[int, dict]], states: tuple[int, ...]) -> int:
        cols = list(updates[0][1])
        marks = ", ".join("?" * len(states))
        self.db.execute("BEGIN IMMEDIATE")
        try:
            done = self.db.executemany(
                f"UPDATE audit_records SET {', '.join(f'{c} = ?' for c in cols)} "
                f"WHERE seq = ? AND state IN ({marks})",
                [(*(new[c] for c in cols), seq, *states) for seq, new in updates]).rowcount
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return done

    def _log_purge(self, now: float, cls: str, action: str, cutoff: float, rows: int) -> None:
        if rows:
            self.db.execute("INSERT INTO audit_purges (time, cls, action, cutoff, rows) "
                            "VALUES (?, ?, ?, ?, ?)", (now, cls, action, cutoff, rows))

    # -- webhook cursors ------------------------------------------------------------------------

    def cursor(self, name: str) -> int:
        row = self.db.execute("SELECT seq FROM audit_cursors WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 0

    def set_cursor(self, name: str, seq: int) -> None:
        self.db.execute("INSERT INTO audit_cursors (name, seq, updated) VALUES (?, ?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET seq = excluded.seq, "
                        "updated = excluded.updated", (name, seq, time.time()))

    def hold_cursor(self, name: str) -> bool:
        return True  # one node per store file
