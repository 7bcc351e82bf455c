"""The reputation store: DMARC aggregate reports, Postmaster Tools and SNDS data, the state of
the importers and the rules reviews.

Same family as the rest of a node's state: a SQLite file (WAL) beside the spool, or, when
``node.spool`` is a PostgreSQL DSN, tables in the cluster's schema of that database, so every
node of a cluster reads and writes one copy (a report that two nodes receive is stored once:
the primary key is reporter + report id + content digest, and ``ON CONFLICT DO NOTHING``
decides the race).
The SQL is written once for both backends (``?`` placeholders become ``%s`` for psycopg); the
interface is synchronous and thread-safe (one connection behind a lock), and the node calls it
through ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..feedback.dmarc import AggregateReport
from ..schema import NewerSchema, naming
from ..secretfile import private_file
from ..spool import is_dsn

__all__ = ["MIGRATIONS", "ReputationStore"]

MIGRATIONS: list[tuple[int, str]] = [(1, """
CREATE TABLE dmarc_reports (
    reporter TEXT NOT NULL, report_id TEXT NOT NULL, org_name TEXT NOT NULL,
    email TEXT NOT NULL, policy_domain TEXT NOT NULL, begin_ts BIGINT NOT NULL,
    end_ts BIGINT NOT NULL, policy TEXT NOT NULL, version TEXT NOT NULL,
    records INTEGER NOT NULL, messages BIGINT NOT NULL, source TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (reporter, report_id));
CREATE INDEX dmarc_reports_end ON dmarc_reports (end_ts);
CREATE TABLE dmarc_rows (
    reporter TEXT NOT NULL, report_id TEXT NOT NULL, idx INTEGER NOT NULL,
    end_ts BIGINT NOT NULL, source_ip TEXT NOT NULL, count BIGINT NOT NULL,
    disposition TEXT NOT NULL, dkim_aligned SMALLINT NOT NULL, spf_aligned SMALLINT NOT NULL,
    header_from TEXT NOT NULL, envelope_from TEXT NOT NULL, envelope_to TEXT NOT NULL,
    dkim TEXT NOT NULL, spf TEXT NOT NULL, reasons TEXT NOT NULL,
    PRIMARY KEY (reporter, report_id, idx));
CREATE INDEX dmarc_rows_end ON dmarc_rows (end_ts);
CREATE TABLE postmaster_stats (
    domain TEXT NOT NULL, day TEXT NOT NULL, domain_reputation TEXT NOT NULL,
    spam_ratio DOUBLE PRECISION, spf_ratio DOUBLE PRECISION, dkim_ratio DOUBLE PRECISION,
    dmarc_ratio DOUBLE PRECISION, ip_reputations TEXT NOT NULL, delivery_errors TEXT NOT NULL,
    raw TEXT NOT NULL, imported_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (domain, day));
CREATE TABLE snds_data (
    ip TEXT NOT NULL, period_start DOUBLE PRECISION NOT NULL,
    period_end DOUBLE PRECISION NOT NULL, rcpt_commands BIGINT NOT NULL,
    data_commands BIGINT NOT NULL, recipients BIGINT NOT NULL, filter TEXT NOT NULL,
    complaint_rate TEXT NOT NULL, complaint_ratio DOUBLE PRECISION, trap_hits BIGINT NOT NULL,
    helo TEXT NOT NULL, mail_from TEXT NOT NULL, comments TEXT NOT NULL,
    imported_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (ip, period_start));
CREATE TABLE reputation_imports (
    source TEXT PRIMARY KEY, last_attempt DOUBLE PRECISION NOT NULL,
    last_success DOUBLE PRECISION, last_error TEXT NOT NULL, rows BIGINT NOT NULL);
CREATE TABLE rule_reviews (
    rule TEXT NOT NULL, reviewed_at DOUBLE PRECISION NOT NULL, reviewer TEXT NOT NULL,
    note TEXT NOT NULL, PRIMARY KEY (rule, reviewed_at));
"""), (2, """
UPDATE dmarc_rows SET end_ts = (SELECT CAST(r.received_at AS BIGINT) FROM dmarc_reports r
    WHERE r.reporter = dmarc_rows.reporter AND r.report_id = dmarc_rows.report_id)
  WHERE end_ts > (SELECT r.received_at FROM dmarc_reports r
    WHERE r.reporter = dmarc_rows.reporter AND r.report_id = dmarc_rows.report_id);
UPDATE dmarc_reports SET end_ts = CAST(received_at AS BIGINT),
    begin_ts = CASE WHEN begin_ts > received_at THEN CAST(received_at AS BIGINT) ELSE begin_ts END
  WHERE end_ts > received_at
"""), (3, """
CREATE TABLE dmarc_reports_v3 (
    reporter TEXT NOT NULL, report_id TEXT NOT NULL, org_name TEXT NOT NULL,
    email TEXT NOT NULL, policy_domain TEXT NOT NULL, begin_ts BIGINT NOT NULL,
    end_ts BIGINT NOT NULL, policy TEXT NOT NULL, version TEXT NOT NULL,
    records INTEGER NOT NULL, messages BIGINT NOT NULL, source TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL, digest TEXT NOT NULL, conflict SMALLINT NOT NULL,
    PRIMARY KEY (reporter, report_id, digest));
INSERT INTO dmarc_reports_v3 SELECT reporter, report_id, org_name, email, policy_domain,
    begin_ts, end_ts, policy, version, records, messages, source, received_at, '', 0
    FROM dmarc_reports;
DROP TABLE dmarc_reports;
ALTER TABLE dmarc_reports_v3 RENAME TO dmarc_reports;
CREATE INDEX dmarc_reports_end ON dmarc_reports (end_ts);
CREATE TABLE dmarc_rows_v3 (
    reporter TEXT NOT NULL, report_id TEXT NOT NULL, idx INTEGER NOT NULL,
    end_ts BIGINT NOT NULL, source_ip TEXT NOT NULL, count BIGINT NOT NULL,
    disposition TEXT NOT NULL, dkim_aligned SMALLINT NOT NULL, spf_aligned SMALLINT NOT NULL,
    header_from TEXT NOT NULL, envelope_from TEXT NOT NULL, envelope_to TEXT NOT NULL,
    dkim TEXT NOT NULL, spf TEXT NOT NULL, reasons TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (reporter, report_id, digest, idx));
INSERT INTO dmarc_rows_v3 SELECT reporter, report_id, idx, end_ts, source_ip, count,
    disposition, dkim_aligned, spf_aligned, header_from, envelope_from, envelope_to, dkim, spf,
    reasons, '' FROM dmarc_rows;
DROP TABLE dmarc_rows;
ALTER TABLE dmarc_rows_v3 RENAME TO dmarc_rows;
CREATE INDEX dmarc_rows_end ON dmarc_rows (end_ts)
""")]
"""Versioned schema (table ``reputation_migrations``): append ``(n + 1, sql)``, never edit an
applied entry. 2: reports stored as ending after they arrived end on arrival, as new ones do
(``add_report``). 3: a report is keyed on its reporter, report id and content digest, with a
``conflict`` flag (``store_report``); reports stored before have the digest ``''``."""


class ReputationStore:
    """The store at ``location``: a PostgreSQL DSN (tables in ``schema``) or a SQLite file."""

    def __init__(self, location: str | Path, schema: str = "postlane") -> None:
        self.location = str(location)
        self.schema = schema
        self.pg = is_dsn(self.location)
        self._lock = threading.RLock()
        self._conn: Any = self._connect()
        try:
            self._migrate()
        except BaseException:
            self._conn.close()
            raise

    # -- connection -----------------------------------------------------------------------------

    def _connect(self) -> Any:
        if self.pg:
            import psycopg  # only where it is used

            from ..spool.postgres import CONNECT_TIMEOUT, redact

            try:
                conn = psycopg.connect(self.location, autocommit=True,  # libpq: whole seconds
                                       connect_timeout=int(CONNECT_TIMEOUT),
                                       application_name=f"postlane-reputation/{self.schema}")
            except psycopg.Error as exc:
                raise ConnectionError(f"cannot open the reputation store at"
                                      f" {redact(self.location)}: {exc}") from None
            conn.execute(f'SET search_path TO "{self.schema}"')
            return conn
        private_file(self.location)  # reporters' data and addresses: 0600 in a 0700 folder
        lite = sqlite3.connect(self.location, check_same_thread=False, isolation_level=None,
                               timeout=30)
        with naming(self.location):
            lite.execute("PRAGMA journal_mode=WAL")
        # FULL: a DMARC report is answered 250 once stored; under NORMAL (WAL) a power loss
        # takes the last commits back, and the reporter does not send it again
        lite.execute("PRAGMA synchronous=FULL")
        return lite

    def _db(self) -> Any:
        """The connection, opened again if PostgreSQL dropped the last one (a restart or a
        failover must not leave the importers failing on a dead socket)."""
        if self.pg and (self._conn.closed or self._conn.broken):
            self._conn = self._connect()
        return self._conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.pg else sql

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock:
            conn = self._db()
            if self.pg:
                with conn.transaction():
                    yield conn
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _exec(self, conn: Any, sql: str, args: Sequence = ()) -> Any:
        return conn.execute(self._sql(sql), tuple(args))

    def _many(self, conn: Any, sql: str, rows: list[tuple]) -> None:
        if self.pg:
            with conn.cursor() as cur:
                cur.executemany(self._sql(sql), rows)
        else:
            conn.executemany(sql, rows)

    def _all(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with self._lock:
            return list(self._exec(self._db(), sql, args).fetchall())

    def _migrate(self) -> None:
        with self._tx() as conn:
            if self.pg:  # one node at a time, under the lock the spool's migrations take
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                             (f"postlane:{self.schema}",))
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            conn.execute("CREATE TABLE IF NOT EXISTS reputation_migrations ("
                         " version INTEGER PRIMARY KEY)")
            current = self._exec(conn, "SELECT coalesce(max(version), 0)"
                                       " FROM reputation_migrations").fetchone()[0]
            if current > MIGRATIONS[-1][0]:
                where = f"PostgreSQL schema {self.schema!r}" if self.pg else self.location
                raise NewerSchema(f"the reputation tables in {where} are at version {current},"
                                  f" newer than this Postlane ({MIGRATIONS[-1][0]})")
            for version, sql in MIGRATIONS:
                if version > current:
                    for statement in filter(str.strip, sql.split(";")):
                        conn.execute(statement)
                    self._exec(conn, "INSERT INTO reputation_migrations VALUES (?)", (version,))

    # -- DMARC ----------------------------------------------------------------------------------

    def add_report(self, report: AggregateReport, source: str, now: float) -> bool:
        """``store_report``: False when it was a duplicate."""
        return self.store_report(report, source, now) != "duplicate"

    def store_report(self, report: AggregateReport, source: str, now: float) -> str:
        """Store a report and its rows once: ``"stored"``, ``"duplicate"`` (this reporter's
        report of this id from this address, with the same content, is already stored: a
        resend, to this node or another of the cluster) or ``"conflict"``.

        The key is the reporter (organisation, else address), the report id and the content
        digest; the address is compared too. Anyone can mail the rua address, so a report with
        a guessed id was enough to have the genuine one dropped as "already stored": now one
        from another address is another report, and one from the same address with other
        content is stored beside the first and both are flagged ``conflict`` (we cannot tell
        which is genuine; keeping both counts the forger's figures, which a fresh id would
        have done anyway, and never loses the reporter's). A report stored before the digest
        existed (``''``) stands for any content from its address.

        A report that claims to end after it arrived is taken as ending on arrival: dated in
        2096, it stayed in every window (and its alerts firing) for good."""
        end = min(report.end, int(now))
        digest, email = report.digest, report.email.lower()
        with self._tx() as conn:
            stored = self._exec(conn, "SELECT email, digest FROM dmarc_reports"
                                      " WHERE reporter = ? AND report_id = ?",
                                (report.reporter, report.report_id)).fetchall()
            same = {d for e, d in stored if e.lower() == email}
            if digest in same or "" in same:
                return "duplicate"
            cur = self._exec(conn, """INSERT INTO dmarc_reports
                VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
                ON CONFLICT (reporter, report_id, digest) DO NOTHING""", (
                report.reporter, report.report_id, report.org_name, report.email,
                report.policy_domain, min(report.begin, end), end, json.dumps(report.policy),
                report.version, len(report.rows), report.messages, source[:200], now, digest,
                int(bool(same))))
            if cur.rowcount == 0:  # another node stored it since the SELECT
                return "duplicate"
            if same:
                self._exec(conn, "UPDATE dmarc_reports SET conflict = 1 WHERE reporter = ?"
                                 " AND report_id = ? AND lower(email) = ?",
                           (report.reporter, report.report_id, email))
            self._many(conn, "INSERT INTO dmarc_rows"
                             " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", [
                (report.reporter, report.report_id, i, end, r.source_ip, r.count,
                 r.disposition, int(r.dkim_aligned), int(r.spf_aligned), r.header_from,
                 r.envelope_from, r.envelope_to, json.dumps(r.dkim), json.dumps(r.spf),
                 json.dumps(r.reasons), digest) for i, r in enumerate(report.rows)])
        return "conflict" if same else "stored"

    def dmarc_sources(self, since: float, domain: str | None = None) -> list[tuple]:
        """Rows of reports that ended since ``since``, summed per (header_from, source_ip,
        dkim_aligned, spf_aligned): ``(header_from, source_ip, dkim, spf, messages)``."""
        sql = ("SELECT header_from, source_ip, dkim_aligned, spf_aligned, sum(count)"
               " FROM dmarc_rows WHERE end_ts >= ?")
        args: list = [int(since)]
        if domain:
            sql += " AND header_from = ?"
            args.append(domain.lower())
        sql += " GROUP BY header_from, source_ip, dkim_aligned, spf_aligned"
        return [(h, ip, bool(d), bool(s), int(n)) for h, ip, d, s, n in self._all(sql, args)]

    def dmarc_report_count(self, since: float, domain: str | None = None) -> int:
        """Reports that ended since ``since``; with ``domain``, those with rows of that header
        From domain (as ``dmarc_sources`` reads)."""
        if domain:
            return self._all("SELECT count(*) FROM (SELECT DISTINCT reporter, report_id,"
                             " digest FROM dmarc_rows WHERE end_ts >= ? AND header_from = ?)"
                             " AS about",
                             (int(since), domain.lower()))[0][0]
        return self._all("SELECT count(*) FROM dmarc_reports WHERE end_ts >= ?",
                         (int(since),))[0][0]

    def dmarc_conflicts(self, since: float) -> int:
        """Reports that ended since ``since`` flagged ``conflict``: another report of the same
        reporter, address and id says something else (``store_report``)."""
        return self._all("SELECT count(*) FROM dmarc_reports WHERE end_ts >= ? AND"
                         " conflict = 1", (int(since),))[0][0]

    # -- Postmaster Tools and SNDS --------------------------------------------------------------

    def put_postmaster(self, rows: list[dict], now: float) -> int:
        """Upsert one row per (domain, day): Google revises a day's figures for a while.
        Returns how many (domain, day) were not stored before (a file imported twice: 0)."""
        cols = ("domain", "day", "domain_reputation", "spam_ratio", "spf_ratio", "dkim_ratio",
                "dmarc_ratio", "ip_reputations", "delivery_errors", "raw")
        update = ", ".join(f"{c} = excluded.{c}" for c in (*cols[2:], "imported_at"))
        latest = {(r["domain"], r["day"]): r for r in rows}  # a key twice: its last row
        with self._tx() as conn:
            new = self._new(conn, "postmaster_stats", ("domain", "day"), list(latest))
            self._many(conn, f"INSERT INTO postmaster_stats VALUES (?,?,?,?,?,?,?,?,?,?,?)"
                             f" ON CONFLICT (domain, day) DO UPDATE SET {update}",
                       [(*(r[c] for c in cols), now) for r in latest.values()])
        return new

    def _new(self, conn: Any, table: str, key: tuple[str, str], keys: list[tuple]) -> int:
        """How many of ``keys`` ``table`` does not hold yet (in the writing transaction)."""
        sql = f"SELECT 1 FROM {table} WHERE {key[0]} = ? AND {key[1]} = ?"
        return sum(self._exec(conn, sql, k).fetchone() is None for k in keys)

    def postmaster(self, since_day: str) -> list[dict]:
        """Days from ``since_day`` (YYYY-MM-DD), newest first."""
        rows = self._all("SELECT domain, day, domain_reputation, spam_ratio, spf_ratio,"
                         " dkim_ratio, dmarc_ratio, ip_reputations, delivery_errors"
                         " FROM postmaster_stats WHERE day >= ? ORDER BY day DESC, domain",
                         (since_day,))
        keys = ("domain", "day", "domain_reputation", "spam_ratio", "spf_ratio", "dkim_ratio",
                "dmarc_ratio", "ip_reputations", "delivery_errors")
        out = [dict(zip(keys, row, strict=True)) for row in rows]
        for item in out:
            item["ip_reputations"] = json.loads(item["ip_reputations"])
            item["delivery_errors"] = json.loads(item["delivery_errors"])
        return out

    _SNDS = ("ip", "period_start", "period_end", "rcpt_commands", "data_commands",
             "recipients", "filter", "complaint_rate", "complaint_ratio", "trap_hits", "helo",
             "mail_from", "comments")

    def put_snds(self, rows: list[dict], now: float) -> int:
        """Upsert one row per (IP, period start); returns how many were not stored before."""
        update = ", ".join(f"{c} = excluded.{c}" for c in (*self._SNDS[2:], "imported_at"))
        latest = {(r["ip"], r["period_start"]): r for r in rows}
        with self._tx() as conn:
            new = self._new(conn, "snds_data", ("ip", "period_start"), list(latest))
            self._many(conn, f"INSERT INTO snds_data VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                             f" ON CONFLICT (ip, period_start) DO UPDATE SET {update}",
                       [(*(r[c] for c in self._SNDS), now) for r in latest.values()])
        return new

    def snds(self, since: float) -> list[dict]:
        """Periods that ended since ``since``, newest first."""
        rows = self._all(f"SELECT {', '.join(self._SNDS)} FROM snds_data WHERE period_end >= ?"
                         " ORDER BY period_start DESC, ip", (since,))
        return [dict(zip(self._SNDS, row, strict=True)) for row in rows]

    def record_import(self, source: str, now: float, error: str = "", rows: int = 0) -> None:
        """An importer's attempt: a success (no ``error``) moves ``last_success``."""
        with self._tx() as conn:
            self._exec(conn, """INSERT INTO reputation_imports VALUES (?,?,?,?,?)
                ON CONFLICT (source) DO UPDATE SET last_attempt = excluded.last_attempt,
                last_success = coalesce(excluded.last_success, reputation_imports.last_success),
                last_error = excluded.last_error,
                rows = CASE WHEN excluded.last_error = '' THEN excluded.rows
                       ELSE reputation_imports.rows END""",
                       (source, now, None if error else now, error[:500], rows))

    def imports(self) -> dict[str, dict]:
        rows = self._all("SELECT source, last_attempt, last_success, last_error, rows"
                         " FROM reputation_imports")
        return {r[0]: {"last_attempt": r[1], "last_success": r[2], "last_error": r[3],
                       "rows": r[4]} for r in rows}

    # -- rules reviews --------------------------------------------------------------------------

    def add_review(self, rule: str, reviewer: str, note: str, now: float) -> None:
        with self._tx() as conn:
            self._exec(conn, "INSERT INTO rule_reviews VALUES (?,?,?,?)",
                       (rule, now, reviewer[:100], note[:1000]))

    def last_reviews(self) -> dict[str, dict]:
        """Per rule, its latest review."""
        rows = self._all("SELECT rule, reviewed_at, reviewer, note FROM rule_reviews r WHERE"
                         " reviewed_at = (SELECT max(reviewed_at) FROM rule_reviews"
                         " WHERE rule = r.rule)")
        return {r[0]: {"reviewed_at": r[1], "reviewer": r[2], "note": r[3]} for r in rows}
