"""The audit store in PostgreSQL: one hash chain that every node of a cluster appends to.

Same contract, tables and columns as ``SQLiteAuditStore`` (``BYTEA`` hashes, ``DOUBLE PRECISION``
times, which give back exactly the floats that were hashed), in the cluster's schema
(``cluster.schema_name``) beside the shared spool.

**One chain, several appenders.** ``append`` hashes each record's content first (no lock
needed), then in one transaction: ``pg_advisory_xact_lock`` on the schema's append key, read the
tail (the last stored row), link the batch after it, COPY it in, update the day seals, COMMIT.
The lock is released by the commit, so the next appender (this node's next batch or another
node's) reads the tail just committed: seq stays dense and every record links to the one before
it, whichever node wrote it. Records of several nodes interleave in commit order. An advisory
lock rather than ``FOR UPDATE`` on a tail row: no extra table that could disagree with the rows,
and a node that dies mid-append releases it with its connection. Holding it costs the chain
hashes (about 1 µs a record) and the insert of one batch.

**Driver: psycopg 3, not asyncpg** (which the spool uses). This store's interface is synchronous
and is called from threads: the writer thread, the CLI, webhook senders through
``asyncio.to_thread`` (any executor thread), tests. On asyncpg it would need an event loop of
its own in a thread of its own and a hop there for every call, and ``verify`` (a server-side
cursor in one REPEATABLE READ snapshot, interleaved with the look-ups that name a break) would be
coroutines driven from another thread. psycopg is synchronous, thread-safe per connection, has
server-side cursors and COPY; the ``binary`` wheel brings its own libpq.

**Shared work.** Retention runs on one node at a time (a session advisory lock; the others skip
that round), and one node at a time delivers each webhook (``hold_cursor``), so a cluster sends
each event once, not once per node.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import count
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ..accounting.records import Record
from ..schema import NewerSchema
from ..spool.postgres import CONNECT_TIMEOUT, redact
from .chain import VERIFY_COLUMNS
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
from .store import COLUMNS, Entry, Query, Retention, StoreMissing, VerifyResult

__all__ = ["MIGRATIONS", "PostgresAuditStore", "SCHEMA_VERSION", "commit_channel"]


def _scalar(row: tuple[Any, ...] | None, query: str) -> Any:
    """The one value of a query that always yields one row (an aggregate, a function call);
    no row there would be a driver or server bug, so it is an error, not a None."""
    if row is None:
        raise RuntimeError(f"PostgreSQL returned no row for {query}")
    return row[0]


def commit_channel(schema: str) -> str:
    """The NOTIFY channel on which every append to ``schema`` is announced, once committed
    (any node's webhook sender wakes on it instead of waiting for its next poll)."""
    return f"postlane_audit_{schema}"

MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE audit_records (
    seq BIGINT PRIMARY KEY, day TEXT NOT NULL, prev BYTEA NOT NULL, hash BYTEA NOT NULL,
    state SMALLINT NOT NULL, nonce BYTEA, pdigest BYTEA, cdigest BYTEA,
    type TEXT, time_logged DOUBLE PRECISION, time_queued DOUBLE PRECISION, orig TEXT, rcpt TEXT,
    queue_id TEXT, cls TEXT, vmta_pool TEXT, orcpt TEXT, dsn_action TEXT, dsn_status TEXT,
    dsn_diag TEXT, dsn_mta TEXT, bounce_cat TEXT, src_type TEXT, src_mta TEXT,
    dlv_source_ip TEXT, dlv_destination_ip TEXT, dlv_tls_protocol TEXT, dlv_tls_cipher TEXT,
    dlv_size BIGINT, vmta TEXT, job_id TEXT, env_id TEXT, correlation_id TEXT, message_id TEXT,
    attempt INTEGER, total_seconds_queued DOUBLE PRECISION, listener TEXT, auth_user TEXT,
    sla DOUBLE PRECISION);
CREATE INDEX ar_queue ON audit_records (queue_id);
CREATE INDEX ar_time ON audit_records (time_logged);
CREATE INDEX ar_msgid ON audit_records (message_id) WHERE type = 'r';
CREATE INDEX ar_corr ON audit_records (correlation_id) WHERE type = 'r';
CREATE INDEX ar_envid ON audit_records (env_id) WHERE type = 'r' AND env_id <> '';
CREATE INDEX ar_rcpt ON audit_records (lower(rcpt)) WHERE type = 'r';
CREATE INDEX ar_cls ON audit_records (cls, time_queued) WHERE type = 'r';
CREATE INDEX ar_pool ON audit_records (vmta_pool, time_queued) WHERE type = 'r';
CREATE TABLE audit_days (
    day TEXT PRIMARY KEY, first_seq BIGINT NOT NULL, last_seq BIGINT NOT NULL,
    records BIGINT NOT NULL, anchor BYTEA NOT NULL, head BYTEA NOT NULL);
CREATE TABLE audit_cursors (
    name TEXT PRIMARY KEY, seq BIGINT NOT NULL, updated DOUBLE PRECISION NOT NULL);
CREATE TABLE audit_operations (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, time DOUBLE PRECISION NOT NULL,
    action TEXT NOT NULL, pool TEXT NOT NULL, domain TEXT NOT NULL);
CREATE TABLE audit_purges (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, time DOUBLE PRECISION NOT NULL,
    cls TEXT NOT NULL, action TEXT NOT NULL, cutoff DOUBLE PRECISION NOT NULL,
    rows BIGINT NOT NULL);
"""),
    (2, """
CREATE TABLE audit_writers (
    writer TEXT PRIMARY KEY, batch BIGINT NOT NULL, last_seq BIGINT NOT NULL,
    time DOUBLE PRECISION NOT NULL);
"""),
    (3, """
ALTER TABLE audit_records ADD COLUMN scheme SMALLINT, ADD COLUMN dlv_tls_auth TEXT,
    ADD COLUMN dlv_tls_policy TEXT, ADD COLUMN operator TEXT, ADD COLUMN ev_writer TEXT,
    ADD COLUMN ev_n BIGINT;
DROP INDEX ar_msgid, ar_corr, ar_envid, ar_rcpt;
CREATE INDEX ax_msgid ON audit_records (message_id);
CREATE INDEX ax_corr ON audit_records (correlation_id);
CREATE INDEX ax_envid ON audit_records (env_id) WHERE env_id <> '';
CREATE INDEX ax_rcpt ON audit_records (lower(rcpt));
CREATE UNIQUE INDEX ax_event ON audit_records (ev_writer, ev_n) WHERE ev_writer IS NOT NULL;
CREATE TABLE audit_feed (
    writer TEXT PRIMARY KEY, n BIGINT NOT NULL, time DOUBLE PRECISION NOT NULL);
DROP TABLE audit_writers;
"""),
    (4, """
CREATE TABLE audit_seals (
    day TEXT NOT NULL, last_seq BIGINT NOT NULL, records BIGINT NOT NULL, head BYTEA NOT NULL,
    sealed_at DOUBLE PRECISION NOT NULL, key_id TEXT NOT NULL, signature BYTEA NOT NULL,
    tsa BYTEA, PRIMARY KEY (day, last_seq));
"""),
    (5, """
CREATE INDEX ax_ops ON audit_records (vmta_pool, time_logged) WHERE type = 'o';
"""),
    (6, """
ALTER TABLE audit_records ADD COLUMN rcpt_key TEXT;
DROP INDEX ax_rcpt;
CREATE INDEX ax_rcpt_nokey ON audit_records (seq) WHERE rcpt_key IS NULL AND rcpt <> '';
"""),
]
"""Versioned schema of the audit tables (table ``audit_migrations``, separate from the spool's
``schema_migrations``): append ``(n + 1, sql)``; never edit an applied entry. The columns are
those of ``store.COLUMNS``; a test checks that they match. 6 adds the recipient's look-up key
(``store.KEY_COLUMNS``) in place of the index on ``lower(rcpt)``, whose folding depends on the
database's ``LC_CTYPE`` (ASCII only under ``C``); ``_fill_rcpt_keys`` fills it in for the rows
already there, in the same transaction, and again at every later start for rows that nodes of
the release before wrote meanwhile (a rolling upgrade: they write no key); ``ax_rcpt_nokey``
holds just those rows, so that look is free when there are none."""

SCHEMA_VERSION = MIGRATIONS[-1][0]


def _fill_rcpt_keys(conn: psycopg.Connection) -> None:
    """The key of every recipient of a row without one, computed here (the key is Python's
    ``address_key``: NFC, IDNA, Unicode case folding, none of which SQL has the same way),
    copied into a temporary table and joined in one UPDATE (one pass, not one per address)."""
    conn.execute("CREATE TEMPORARY TABLE rcpt_keys (rcpt TEXT PRIMARY KEY, rcpt_key TEXT)"
                 " ON COMMIT DROP")
    with conn.cursor(f"audit_rcpts_{next(_names)}") as names, conn.cursor() as cur:
        names.execute("SELECT DISTINCT rcpt FROM audit_records"
                      " WHERE rcpt_key IS NULL AND rcpt <> ''")
        while batch := names.fetchmany(10000):  # no COPY open while the cursor fetches
            with cur.copy("COPY rcpt_keys (rcpt, rcpt_key) FROM STDIN") as copy:
                for (rcpt,) in batch:
                    copy.write_row((rcpt, rcpt_key(rcpt)))
    conn.execute("UPDATE audit_records a SET rcpt_key = k.rcpt_key FROM rcpt_keys k"
                 " WHERE a.rcpt = k.rcpt AND a.rcpt_key IS NULL AND a.rcpt <> ''")

_INSERT = f"COPY audit_records ({', '.join(COLUMNS)}) FROM STDIN"
_names = count()


class PostgresAuditStore(RetentionMixin):
    """The audit store in schema ``schema`` of the database at ``dsn``. One connection; one
    thread at a time per instance (like the SQLite store). ``readonly``: no migrations, and
    every transaction is read-only (the CLI's evidence commands)."""

    def __init__(self, dsn: str, schema: str = "postlane", *, readonly: bool = False) -> None:
        self.dsn = dsn
        self.schema = schema
        self.readonly = readonly
        self._held: set[str] = set()  # cursors this connection holds the webhook lock of
        self._conn = self._connect()
        try:
            if readonly:
                self._check_schema()
            else:
                self._migrate()
        except BaseException:
            self._conn.close()
            raise

    # -- connection and schema ------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT),
                                   application_name=f"postlane-audit/{self.schema}")
        except psycopg.Error as exc:
            raise ConnectionError(f"cannot open the PostgreSQL audit store at"
                                  f" {redact(self.dsn)}: {exc}") from None
        conn.execute(f'SET search_path TO "{self.schema}"')
        if self.readonly:
            conn.execute("SET default_transaction_read_only = on")
        return conn

    def _db(self) -> psycopg.Connection:
        """The connection, opened again if the last one broke (a database restart or failover:
        the writer retries its batch, and the retry must not fail on a dead socket)."""
        if self._conn.closed or self._conn.broken:
            self._held.clear()  # session locks went with the old connection
            self._conn = self._connect()
        return self._conn

    def _migrate(self) -> None:
        """Create or upgrade the audit tables, one node at a time: under the advisory lock the
        spool's migrations take too, so the two never race at creating the schema."""
        conn = self._conn
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"postlane:{self.schema}",))
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            conn.execute("CREATE TABLE IF NOT EXISTS audit_migrations ("
                         " version INTEGER PRIMARY KEY,"
                         " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            current = self._version()
            for version, sql in MIGRATIONS:
                if version > current:
                    conn.execute(sql)
                    if version == 6:  # the index after the back-fill: built once, not updated
                        _fill_rcpt_keys(conn)
                        conn.execute("CREATE INDEX ax_rcpt_key ON audit_records (rcpt_key)")
                    conn.execute("INSERT INTO audit_migrations (version) VALUES (%s)", (version,))
            if current >= 6:
                _fill_rcpt_keys(conn)

    def _check_schema(self) -> None:
        found = _scalar(self._conn.execute("SELECT to_regclass(%s)",
                                           (f'"{self.schema}".audit_migrations',)).fetchone(),
                        "to_regclass")
        if found is None:
            raise StoreMissing(f"no audit store in schema {self.schema!r} at {redact(self.dsn)}")
        self._version()

    def _version(self) -> int:
        current: int = _scalar(self._conn.execute(
            "SELECT coalesce(max(version), 0) FROM audit_migrations").fetchone(), "max(version)")
        if current > SCHEMA_VERSION:
            raise NewerSchema(f"the audit tables in PostgreSQL schema {self.schema!r} are at"
                               f" version {current}, newer than this Postlane ({SCHEMA_VERSION})")
        return current

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _snapshot(self) -> Iterator[psycopg.Connection]:
        """One REPEATABLE READ transaction: every statement in it sees the same committed
        state, whatever other nodes append meanwhile."""
        conn = self._db()
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield conn

    # -- writing --------------------------------------------------------------------------------

    def feed_cursors(self) -> dict[str, int]:
        return dict(self._db().execute("SELECT writer, n FROM audit_feed").fetchall())

    def query(self, sql: str, args: Iterable = ()) -> list[tuple]:
        return self._db().execute(sql, list(args)).fetchall()

    def seals(self) -> list[Seal]:
        return [seal_from_row(r)
                for r in self.query(f"SELECT {SEAL_COLS} FROM audit_seals ORDER BY day,"
                                    " last_seq")]

    def add_seal(self, seal: Seal) -> None:
        self._db().execute(f"INSERT INTO audit_seals ({SEAL_COLS}) VALUES"
                           " (%s, %s, %s, %s, %s, %s, %s, %s)", seal_row(seal))

    def records_of(self, writer: str, first: int, last: int) -> list[tuple[int, Record]]:
        """See ``queries.records_of``."""
        return records_of(self, "%s", writer, first, last)

    def row_at(self, seq: int) -> tuple | None:
        """(hash, day, records of that day up to it) of record ``seq``, for seal checks."""
        return row_at(self, "%s", seq)

    def completeness(self, spool: SpoolView | None = None,
                     filed: dict[str, int] | None = None) -> Completeness:
        """See ``completeness.check``."""
        return check(self, "%s", self.feed_cursors(), spool, filed)

    def append(self, batch: Sequence[Entry]) -> int:
        """Chain and insert records (with their class SLA) in one transaction, after whatever
        any node appended last; returns the last seq. Text PostgreSQL refuses (NUL, lone
        surrogates) is replaced by U+FFFD, and only then hashed. Events the store holds
        already are skipped (see ``Entry``)."""
        try:
            return self._append(prepare(batch))
        except (psycopg.DataError, UnicodeEncodeError):
            return self._append(prepare(batch, clean=True))

    def _append(self, prepared: list) -> int:
        conn = self._db()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                         (f"postlane-audit-append:{self.schema}",))
            prepared, cursors = fresh(prepared, self.feed_cursors())
            last = conn.execute("SELECT seq, hash, day FROM audit_records"
                                " ORDER BY seq DESC LIMIT 1").fetchone()
            tail = (last[0], bytes(last[1]), last[2]) if last else (0, bytes(32), "")
            if not prepared:
                return tail[0]
            rows, days, tail = link(prepared, tail)
            with conn.cursor() as cur:
                with cur.copy(_INSERT) as copy:
                    for row in rows:
                        copy.write_row(row)
                cur.executemany(
                    "INSERT INTO audit_days (day, first_seq, last_seq, records, anchor, head)"
                    " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (day) DO UPDATE SET"
                    " last_seq = excluded.last_seq, records = audit_days.records"
                    " + excluded.records, head = excluded.head",
                    [(d, *s) for d, s in days.items()])
                now = time.time()
                cur.executemany(
                    "INSERT INTO audit_feed VALUES (%s, %s, %s) ON CONFLICT (writer)"
                    " DO UPDATE SET n = excluded.n, time = excluded.time",
                    [(w, n, now) for w, n in cursors.items()])
                cur.execute("SELECT pg_notify(%s, '')", (commit_channel(self.schema),))
        return tail[0]

    # -- reading --------------------------------------------------------------------------------

    def find(self, query: Query) -> list[dict]:
        """Every record of the messages matching the keys (a recipient key keeps only that
        recipient's records), in chain order."""
        sql, args = find_sql(query, "%s")
        with self._db().cursor(row_factory=dict_row) as cur:
            return cur.execute(sql + " ORDER BY seq", args).fetchall()

    def rows_between(self, since: float | None, until: float | None,
                     cls: str | None = None) -> Iterator[dict]:
        """Records logged in [since, until), optionally of one class, in chain order (read
        through a server-side cursor: an export of millions of rows stays small in memory)."""
        where, args = between_where(since, until, cls, "%s")
        conn = self._db()
        with conn.transaction(), conn.cursor(f"audit_rows_{next(_names)}",
                                             row_factory=dict_row) as cur:
            cur.itersize = 2000
            cur.execute(f"SELECT * FROM audit_records WHERE {where} ORDER BY seq", args)
            yield from cur

    def rows_after(self, seq: int, types: Sequence[str], classes: Sequence[str],
                   limit: int) -> tuple[list[dict], int]:
        """Up to ``limit`` records after ``seq`` that pass the filters, and the seq the caller
        may move its cursor to once they are delivered (past filtered-out records too). Appends
        commit in seq order (one at a time), so a snapshot never lacks a seq below its top."""
        where = ["seq > %s"]
        args: list[int | list[str]] = [seq]
        if types:
            where.append("type = ANY(%s)")
            args.append(list(types))
        if classes:
            where.append("cls = ANY(%s)")
            args.append(list(classes))
        with self._snapshot() as conn, conn.cursor(row_factory=dict_row) as cur:
            found = cur.execute("SELECT coalesce(max(seq), 0) AS top FROM audit_records"
                                ).fetchone()
            if found is None:  # an aggregate always yields one row
                raise RuntimeError("PostgreSQL returned no row for max(seq)")
            top = found["top"]
            rows = cur.execute(f"SELECT * FROM audit_records WHERE {' AND '.join(where)}"
                               " AND seq <= %s ORDER BY seq LIMIT %s",
                               [*args, top, limit]).fetchall()
        if len(rows) == limit:
            return rows, rows[-1]["seq"]
        return rows, max(top, seq)

    def days(self) -> list[dict]:
        with self._db().cursor(row_factory=dict_row) as cur:
            return cur.execute("SELECT * FROM audit_days ORDER BY day").fetchall()

    def purges(self) -> list[dict]:
        with self._db().cursor(row_factory=dict_row) as cur:
            return cur.execute("SELECT * FROM audit_purges ORDER BY id").fetchall()

    def pauses(self, pool: str, until: float) -> list[tuple[float, float, str]]:
        """(start, end, domain) of each pause of ``pool`` begun before ``until``; an open pause
        ends at ``until``."""
        return pause_spans(self._db().execute(pauses_sql("%s"), (pool, until) * 2), until)

    def classes(self) -> list[str]:
        return [r[0] for r in self._db().execute(CLASSES_SQL)]

    # -- verification ---------------------------------------------------------------------------

    def seqs_with_hash(self, digest: bytes) -> list[int]:
        return [r[0] for r in self._db().execute(
            "SELECT seq FROM audit_records WHERE hash = %s ORDER BY seq", (digest,))]

    def seqs_linking_to(self, digest: bytes) -> list[int]:
        return [r[0] for r in self._db().execute(
            "SELECT seq FROM audit_records WHERE prev = %s ORDER BY seq", (digest,))]

    def verify(self, since_day: str | None = None) -> VerifyResult:
        """Walk the chain (from the start of ``since_day``) and check every day's seal, in one
        snapshot: batches other nodes commit meanwhile are not part of this walk."""
        with self._snapshot() as conn:
            return walk(self, self.days(), since_day, lambda start: self._verify_rows(conn, start))

    @staticmethod
    def _verify_rows(conn: psycopg.Connection, start_seq: int) -> Iterator[tuple]:
        with conn.cursor(f"audit_verify_{next(_names)}") as cur:
            cur.itersize = 10000
            cur.execute(f"SELECT {', '.join(VERIFY_COLUMNS)}, day FROM audit_records"
                        " WHERE seq >= %s ORDER BY seq", (start_seq,))
            yield from cur

    # -- retention (RetentionMixin) -------------------------------------------------------------

    def purge(self, policies: Mapping[str, Retention], key: bytes | None,
              now: float) -> dict[str, dict[str, int]]:
        """Apply retention, on one node at a time: a node that finds another purging skips
        this round (returns an empty report); the next round catches up."""
        lock = ("SELECT pg_try_advisory_lock(hashtext(%s))",
                (f"postlane-audit-purge:{self.schema}",))
        conn = self._db()
        if not _scalar(conn.execute(*lock).fetchone(), "pg_try_advisory_lock"):
            return {}
        try:
            return super().purge(policies, key, now)
        finally:
            if not (conn.closed or conn.broken):
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", lock[1])

    def _candidates(self, cls: str, cutoff: float, states: tuple[int, ...], after: int,
                    limit: int) -> list[dict]:
        with self._db().cursor(row_factory=dict_row) as cur:
            return cur.execute(
                "SELECT * FROM audit_records WHERE cls = %s AND time_queued < %s AND"
                " state = ANY(%s) AND seq > %s ORDER BY seq LIMIT %s",
                (cls, cutoff, list(states), after, limit)).fetchall()

    def _write_changes(self, updates: list[tuple[int, dict]], states: tuple[int, ...]) -> int:
        cols = list(updates[0][1])
        conn = self._db()
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(f"UPDATE audit_records SET {', '.join(f'{c} = %s' for c in cols)}"
                            " WHERE seq = %s AND state = ANY(%s)",
                            [(*(new[c] for c in cols), seq, list(states)) for seq, new in updates])
            return cur.rowcount

    def _log_purge(self, now: float, cls: str, action: str, cutoff: float, rows: int) -> None:
        if rows:
            self._db().execute("INSERT INTO audit_purges (time, cls, action, cutoff, rows)"
                               " VALUES (%s, %s, %s, %s, %s)", (now, cls, action, cutoff, rows))

    # -- webhook cursors ------------------------------------------------------------------------

    def cursor(self, name: str) -> int:
        row = self._db().execute("SELECT seq FROM audit_cursors WHERE name = %s",
                                 (name,)).fetchone()
        return row[0] if row else 0

    def set_cursor(self, name: str, seq: int) -> None:
        self._db().execute("INSERT INTO audit_cursors (name, seq, updated) VALUES (%s, %s, %s)"
                           " ON CONFLICT (name) DO UPDATE SET seq = excluded.seq,"
                           " updated = excluded.updated", (name, seq, time.time()))

    def hold_cursor(self, name: str) -> bool:
        """Try to become the one sender of webhook ``name`` in the cluster: a session advisory
        lock, held until this connection closes (a dead node's lock goes with it, and another
        node's sender takes over at its next try)."""
        conn = self._db()
        if name in self._held:
            return True
        got = _scalar(conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))",
                                   (f"postlane-audit-cursor:{self.schema}:{name}",)).fetchone(),
                      "pg_try_advisory_lock")
        if got:
            self._held.add(name)
        return bool(got)
