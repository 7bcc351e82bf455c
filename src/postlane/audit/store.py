"""The audit store: every accounting record, hash-chained and indexed for evidence queries.

``AuditStore`` is the interface the rest of Postlane uses; ``SQLiteAuditStore`` is the embedded
backend (one file, WAL; one node appends) and ``postgres.PostgresAuditStore`` the cluster one
(several nodes append to one chain). What does not depend on the backend lives here and both
use it, so they cannot drift apart: how a batch is hashed (``prepare``) and linked (``link``),
how a chain is walked (``walk``) and how retention rewrites rows (``RetentionMixin``).
``backend.open_audit_store`` picks the backend from the config. Readers (the CLI, webhooks) use
their own connections and never block the writer.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .. import schema
from ..accounting.records import Record
from ..secretfile import private_file
from .chain import (
    CHAIN_COLUMNS,
    EXTRA_COLUMNS,
    FLOATS,
    GENESIS,
    HASHED,
    INTACT,
    PERSONAL,
    PSEUDONYMISED,
    PURGED,
    RECORD_COLUMNS,
    SCHEME,
    VERIFY_COLUMNS,
    ChainLookup,
    ChainVerifier,
    Problem,
    chain_hash,
    content_digest,
    personal_digest,
    pseudonymise_row,
    row_cdigest,
    verify_tuple,
)
from .completeness import Completeness, SpoolView, check
from .seal import Seal

__all__ = ["MIGRATIONS", "AuditStore", "Entry", "Query", "Retention", "RetentionMixin",
           "SQLiteAuditStore", "StoreMissing", "StoreOutdated", "VerifyResult", "baseline",
           "check_days", "day_of", "fresh", "link", "pauses_sql", "prepare", "row_record",
           "seal_row", "walk"]

COLUMNS: tuple[str, ...] = CHAIN_COLUMNS + RECORD_COLUMNS + EXTRA_COLUMNS
#: Versioned schema (table ``audit_migrations``; ``schema.migrate``): append ``(n + 1, sql)``,
#: never edit a released entry. 1 is the store of hash scheme 1; 2 adds the columns of scheme 2
#: (old rows keep NULL there and verify as scheme 1), the lookup keys on every record (they
#: covered "r" rows only) and each record's spool event (unique: an event is chained once,
#: whatever replays a crash causes); 3 the day seals (Ed25519 signatures, time-stamps); 4 the
#: index of operators' actions. The columns are those of ``COLUMNS`` (a test checks).
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
]


def baseline(conn: sqlite3.Connection) -> int:
    """The version of a store written before versions were recorded (0: none yet)."""
    have = schema.columns(conn, "audit_records")
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'ax_ops'").fetchone():
        return 4
    if schema.columns(conn, "audit_seals"):
        return 3
    return 0 if not have else 2 if "ev_n" in have else 1


#: What a purged row keeps besides its chain columns (nothing personal; enough for statistics).
_KEPT_AFTER_PURGE = frozenset({"type", "time_logged", "time_queued", "queue_id", "cls",
                               "vmta_pool", "ev_writer", "ev_n"})
_PURGE_BATCH = 5000
_RECORD_GETTER = operator.attrgetter(*RECORD_COLUMNS)
_FLOAT_POSITIONS = [i for i, c in enumerate(RECORD_COLUMNS) if c in FLOATS]
_PERSONAL_POSITIONS = [RECORD_COLUMNS.index(c) for c in PERSONAL]
_HASHED_POSITIONS = [(RECORD_COLUMNS + EXTRA_COLUMNS).index(c) for c in HASHED]
"""Where each HASHED value is in a record's values followed by its EXTRA_COLUMNS values."""
_RECORD_KINDS = {f.name: {"str": str, "int": int, "float": float}[str(f.type)]
                 for f in dataclasses.fields(Record) if f.name in RECORD_COLUMNS}


def row_record(row: Mapping[str, object]) -> Record:
    """A stored row as a Record (purged fields come back empty), for PowerMTA-style output."""
    values = {}
    for name, kind in _RECORD_KINDS.items():
        value = row[name]
        values[name] = kind(value) if value is not None else kind()
    return Record(**values)  # type: ignore[arg-type]


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


@dataclass(slots=True)
class Query:
    """Evidence look-up: any combination of keys; times bound the message's queue time."""

    queue_id: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    env_id: str | None = None
    rcpt: str | None = None
    cls: str | None = None
    pool: str | None = None
    since: float | None = None
    until: float | None = None


@dataclass(slots=True)
class Retention:
    """Per class: pseudonymise and/or delete records this many seconds after queueing."""

    pseudonymise: float | None = None
    delete: float | None = None


@dataclass
class VerifyResult:
    ok: bool
    checked: int
    problem: Problem | None
    first_seq: int | None
    last_seq: int | None
    head: str
    pseudonymised: int = 0
    purged: int = 0
    days: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "checked": self.checked,
                "problem": str(self.problem) if self.problem else None,
                "first_seq": self.first_seq, "last_seq": self.last_seq, "head": self.head,
                "pseudonymised": self.pseudonymised, "purged": self.purged}


class AuditStore(Protocol):
    def append(self, batch: Sequence[Entry]) -> int: ...

    def feed_cursors(self) -> dict[str, int]:
        """Each spool writer's last event number the store holds (see ``Entry``)."""
        ...

    def completeness(self, spool: SpoolView | None = None) -> Completeness: ...

    def seals(self) -> list[Seal]: ...

    def add_seal(self, seal: Seal) -> None: ...

    def row_at(self, seq: int) -> tuple | None: ...

    def find(self, query: Query) -> list[dict]: ...

    def rows_between(self, since: float | None, until: float | None,
                     cls: str | None = None) -> Iterator[dict]: ...

    def rows_after(self, seq: int, types: Sequence[str], classes: Sequence[str],
                   limit: int) -> tuple[list[dict], int]: ...

    def verify(self, since_day: str | None = None) -> VerifyResult: ...

    def days(self) -> list[dict]: ...

    def purges(self) -> list[dict]: ...

    def pauses(self, pool: str, until: float) -> list[tuple[float, float, str]]: ...

    def classes(self) -> list[str]: ...

    def purge(self, policies: Mapping[str, Retention], key: bytes | None,
              now: float) -> dict[str, dict[str, int]]: ...

    def cursor(self, name: str) -> int: ...

    def set_cursor(self, name: str, seq: int) -> None: ...

    def hold_cursor(self, name: str) -> bool:
        """Whether this instance may deliver (and move) cursor ``name``: with several nodes on
        one store, one webhook sender at a time does."""
        ...

    def close(self) -> None: ...


class StoreMissing(FileNotFoundError):
    """A read-only open found no audit store (no file, or no audit tables in the schema)."""


class StoreOutdated(StoreMissing):
    """A read-only open found a store of an older schema (a node, or ``postlane upgrade``,
    migrates it)."""


# -- backend-neutral pieces ---------------------------------------------------------------------

#: A record ready to be chained: its RECORD_COLUMNS values, its EXTRA_COLUMNS values, nonce,
#: pdigest, content digest and time_logged; everything its hash needs but the previous hash.
Prepared = tuple[list, tuple, bytes, bytes, bytes, float]

Entry = tuple
"""What ``append`` takes per record: ``(record, sla)``, or ``(record, sla, writer, n)`` for a
record made from spool event ``n`` of ``writer`` (the evidence outbox). ``record`` is a Record
or its RECORD_COLUMNS values. The store keeps each writer's last event number beside the
records, in the same transaction, and skips events it already holds: a replay after a crash
(the recorder cannot know whether its last append committed) adds nothing."""


def _clean_text(value: object) -> object:
    """Text PostgreSQL cannot store (NUL, lone surrogates) with U+FFFD in its place."""
    if not isinstance(value, str):
        return value
    value = value.replace("\x00", "\ufffd")
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)


def prepare(batch: Sequence[Entry], *, clean: bool = False) -> list[Prepared]:
    """Hash each record's content (the part of its hash that does not depend on the chain), so
    that a backend can do it before taking its append lock. ``clean`` first replaces text that
    PostgreSQL refuses, so the stored row is exactly what the hash covers."""
    out: list[Prepared] = []
    urandom, fields = os.urandom, _RECORD_GETTER
    for entry in batch:
        record, sla = entry[0], entry[1]
        writer, n = (entry[2], entry[3]) if len(entry) > 2 else (None, None)
        row = list(fields(record) if isinstance(record, Record) else record)
        if clean:
            row = [_clean_text(v) for v in row]
        for i in _FLOAT_POSITIONS:  # stored as floating point: hash what will be read back
            row[i] = float(row[i])
        extra = (None if sla is None else float(sla), writer, n)
        nonce = urandom(16)
        pdigest = personal_digest(nonce, [row[i] for i in _PERSONAL_POSITIONS])
        full = row + list(extra)
        hashed = [full[i] for i in _HASHED_POSITIONS]
        out.append((row, extra, nonce, pdigest, content_digest(hashed, pdigest), row[1]))
    return out


def fresh(prepared: list[Prepared], stored: Mapping[str, int]) -> tuple[list[Prepared],
                                                                         dict[str, int]]:
    """The prepared records whose events the store does not hold yet (``stored``: each
    writer's last event number there), and each writer's new last number."""
    keep, last = [], dict(stored)
    for item in prepared:
        writer, n = item[1][1], item[1][2]
        if writer is not None:
            if n <= last.get(writer, 0):
                continue
            last[writer] = n
        keep.append(item)
    return keep, {w: n for w, n in last.items() if n != stored.get(w)}


def between_where(since: float | None, until: float | None, cls: str | None,
                  mark: str) -> tuple[str, list]:
    """The WHERE clause of ``rows_between`` for both backends (``mark``: the placeholder)."""
    where, args = ["1 = 1"], []
    for clause, value in ((f"time_logged >= {mark}", since), (f"time_logged < {mark}", until),
                          (f"cls = {mark}", cls)):
        if value is not None:
            where.append(clause)
            args.append(value)
    return " AND ".join(where), args


def find_sql(query: Query, mark: str, rcpt_match: str) -> tuple[str, list]:
    """The evidence query of both backends: ``mark`` is the driver's placeholder, and
    ``rcpt_match`` the case-insensitive recipient comparison with one placeholder."""
    where: list[str] = []
    args: list = []
    keys = {"queue_id": query.queue_id, "message_id": query.message_id,
            "correlation_id": query.correlation_id, "env_id": query.env_id,
            "cls": query.cls, "vmta_pool": query.pool}
    for col, value in keys.items():
        if value is not None:
            where.append(f"{col} = {mark}")
            args.append(value)
    if query.env_id is not None:
        where.append("env_id <> ''")
    if query.rcpt is not None:
        where.append(rcpt_match)
        args.append(query.rcpt)
    if query.since is not None:
        where.append(f"time_queued >= {mark}")
        args.append(query.since)
    if query.until is not None:
        where.append(f"time_queued < {mark}")
        args.append(query.until)
    if not where:
        raise ValueError("an evidence query needs at least one key or a time range")
    if not any(keys[k] is not None for k in ("queue_id", "message_id", "correlation_id",
                                              "env_id")) and query.rcpt is None:
        # a class, pool or time scan (the SLA report): the "r" rows name every message, and
        # the literal lets the database use the partial indexes on them
        where.insert(0, "type = 'r'")
    sql = (f"SELECT * FROM audit_records WHERE queue_id IN (SELECT queue_id FROM "
           f"audit_records WHERE {' AND '.join(where)})")
    if query.rcpt is not None:
        sql += f" AND {rcpt_match}"
        args.append(query.rcpt)
    return sql, args


def link(prepared: Sequence[Prepared], tail: tuple[int, bytes, str]
         ) -> tuple[list[tuple], dict[str, list], tuple[int, bytes, str]]:
    """Chain prepared records after ``tail`` (seq, hash and day of the last stored row).
    Returns the rows to insert (COLUMNS order), each day's [first_seq, last_seq, records,
    anchor, head] and the new tail. A day never goes back: a record logged before midnight by
    a node whose clock is behind joins the day already open."""
    seq, prev, day = tail
    rows: list[tuple] = []
    days: dict[str, list] = {}
    day_number = -1
    for row, extra, nonce, pdigest, cdigest, logged in prepared:
        seq += 1
        number = int(logged // 86400)
        if number != day_number:  # strftime once per day, not per record
            day_number = number
            day = max(day, day_of(logged))
        digest = chain_hash(prev, cdigest)
        stats = days.get(day)
        if stats is None:
            days[day] = [seq, seq, 1, prev, digest]
        else:
            stats[1], stats[4] = seq, digest
            stats[2] += 1
        rows.append((seq, day, prev, digest, INTACT, nonce, pdigest, None, SCHEME, *row, *extra))
        prev = digest
    return rows, days, (seq, prev, day)


def walk(lookup: ChainLookup, days: list[dict], since_day: str | None,
         rows_from: Callable[[int], Iterable[Sequence]]) -> VerifyResult:
    """Verify a chain: ``days`` are the store's day seals, ``rows_from(seq)`` yields the rows
    from ``seq`` on (VERIFY_COLUMNS, then the day). Both must come from one snapshot of the
    store, or records appended in between look inserted."""
    before: list[dict] = []
    if since_day is not None:
        before = [d for d in days if d["day"] < since_day]
        days = [d for d in days if d["day"] >= since_day]
    verifier = ChainVerifier(lookup)
    start_seq = 0
    if since_day is None or not before:
        verifier.start(GENESIS)
    else:
        verifier.start(bytes(before[-1]["head"]))
        start_seq = days[0]["first_seq"] if days else before[-1]["last_seq"] + 1
    seen: dict[str, list] = {}
    ok = True
    check = verifier.feed
    rows = rows_from(start_seq)
    try:
        for row in rows:
            if not check((row,)):
                ok = False
                break
            stats = seen.get(row[-1])
            if stats is None:
                seen[row[-1]] = [row[0], row[0], 1, row[2]]
            else:
                stats[1], stats[3] = row[0], row[2]
                stats[2] += 1
    finally:
        close = getattr(rows, "close", None)
        if close is not None:  # a generator holding a cursor: release it before the snapshot ends
            close()
    if ok:
        ok = check_days(verifier, days, seen)
    return VerifyResult(ok=ok, checked=verifier.checked, problem=verifier.problem,
                        first_seq=verifier.first_seq, last_seq=verifier.last_seq,
                        head=verifier.head.hex(), pseudonymised=verifier.pseudonymised,
                        purged=verifier.purged, days=days)


CLASSES_SQL = ("SELECT DISTINCT cls FROM audit_records WHERE cls IS NOT NULL AND cls <> ''"
               " ORDER BY cls")
"""The classes in the store (records of actions on a pool or the suppression list have none)."""


def pauses_sql(mark: str) -> str:
    """The pauses and resumes of one pool before a time (parameters: pool, time, pool, time),
    as (time, action, domain) oldest first: the operators' chained "o" records (domain from
    ``*@DOMAIN``, "*" for the whole pool) and the unchained ``audit_operations`` table that
    stores written before them kept. ``mark``: the driver's placeholder."""
    return (f"SELECT time, action, domain FROM audit_operations WHERE pool = {mark}"
            f" AND time < {mark} UNION ALL SELECT time_logged, dsn_action, CASE WHEN"
            " coalesce(rcpt, '') = '' THEN '*' ELSE substr(rcpt, 3) END FROM audit_records"
            f" WHERE type = 'o' AND vmta_pool = {mark} AND time_logged < {mark}"
            " AND dsn_action IN ('pause', 'resume') ORDER BY 1")


def pause_spans(operations: Iterable[Sequence], until: float) -> list[tuple[float, float, str]]:
    """Pair (time, action, domain) operations, oldest first, into (start, end, domain) pauses;
    a pause not yet resumed ends at ``until``."""
    out: list[tuple[float, float, str]] = []
    started: dict[str, float] = {}
    for when, action, domain in operations:
        if action == "pause":
            started.setdefault(domain, when)
        elif action == "resume" and domain in started:
            out.append((started.pop(domain), when, domain))
    out.extend((start, until, domain) for domain, start in started.items())
    return sorted(out)


def check_days(verifier: ChainVerifier, days: list[dict], seen: dict[str, list]) -> bool:
    """The day seals catch what the links cannot: records cut off the end of a day."""
    for day in days:
        got = seen.pop(day["day"], None)
        if got is None:
            verifier.problem = Problem(day["first_seq"], "removed",
                                       f"all {day['records']} records of {day['day']} "
                                       f"(seq {day['first_seq']}..{day['last_seq']}) are "
                                       "missing")
            return False
        if got[1] != day["last_seq"] or bytes(got[3]) != bytes(day["head"]) or \
                got[2] != day["records"]:
            verifier.problem = Problem(got[1] + 1 if got[1] < day["last_seq"] else got[1],
                                       "removed" if got[2] < day["records"] else "inserted",
                                       f"day {day['day']} was sealed with {day['records']} "
                                       f"records ending at seq {day['last_seq']}, the store "
                                       f"has {got[2]} ending at seq {got[1]}")
            return False
    if seen:
        day, got = next(iter(seen.items()))
        verifier.problem = Problem(got[0], "inserted", f"day {day} has no seal")
        return False
    return True


class RetentionMixin:
    """Retention on any backend, which supplies ``_candidates`` (rows of a class queued before
    a cutoff, in some states, after a seq), ``_write_changes`` and ``_log_purge``."""

    def purge(self, policies: Mapping[str, Retention], key: bytes | None,
              now: float) -> dict[str, dict[str, int]]:
        """Apply retention: pseudonymise, then delete (to a tombstone), per class. A row whose
        own hash does not check is left alone and counted, so purging never launders a tamper."""
        report: dict[str, dict[str, int]] = {}
        for cls, policy in policies.items():
            counts = {"pseudonymised": 0, "purged": 0, "skipped_tampered": 0}
            if policy.pseudonymise is not None:
                if key is None:
                    raise ValueError("pseudonymisation needs a key")
                cutoff = now - policy.pseudonymise
                counts["pseudonymised"], bad = self._rewrite(
                    cls, cutoff, (INTACT,), lambda row: pseudonymise_row(row, key))
                counts["skipped_tampered"] += bad
                self._log_purge(now, cls, "pseudonymise", cutoff, counts["pseudonymised"])
            if policy.delete is not None:
                cutoff = now - policy.delete
                counts["purged"], bad = self._rewrite(cls, cutoff, (INTACT, PSEUDONYMISED),
                                                      _tombstone)
                counts["skipped_tampered"] += bad
                self._log_purge(now, cls, "delete", cutoff, counts["purged"])
            report[cls] = counts
        return report

    def _rewrite(self, cls: str, cutoff: float, states: tuple[int, ...],
                 change: Callable[[dict], dict]) -> tuple[int, int]:
        done = bad = 0
        last = 0
        while True:
            rows = self._candidates(cls, cutoff, states, last, _PURGE_BATCH)
            if not rows:
                return done, bad
            last = rows[-1]["seq"]
            updates = []
            for row in rows:
                cdigest, complaint = row_cdigest(verify_tuple(row))
                if complaint or chain_hash(bytes(row["prev"]), cdigest) != bytes(row["hash"]):
                    bad += 1
                    continue
                row["cdigest"] = cdigest
                updates.append((row["seq"], change(row)))
            if updates:
                done += self._write_changes(updates, states)

    def _candidates(self, cls: str, cutoff: float, states: tuple[int, ...], after: int,
                    limit: int) -> list[dict]:
        raise NotImplementedError

    def _write_changes(self, updates: list[tuple[int, dict]], states: tuple[int, ...]) -> int:
        """Apply ``updates`` (seq, new values) to rows still in ``states``; returns how many."""
        raise NotImplementedError

    def _log_purge(self, now: float, cls: str, action: str, cutoff: float, rows: int) -> None:
        raise NotImplementedError




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
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL: a commit survives a process crash; the accounting file is the
            # record of truth for the last instants before a power loss.
            self.db.execute("PRAGMA synchronous=NORMAL")
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
        return [Seal(*r[:6], bytes(r[6]), bytes(r[7]) if r[7] is not None else None)
                for r in self.query(f"SELECT {_SEAL_COLS} FROM audit_seals ORDER BY day,"
                                    " last_seq")]

    def add_seal(self, seal: Seal) -> None:
        self.db.execute(f"INSERT INTO audit_seals ({_SEAL_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        seal_row(seal))

    def row_at(self, seq: int) -> tuple | None:
        """(hash, day, records of that day up to it) of record ``seq``, for seal checks."""
        return _row_at(self, "?", seq)

    def completeness(self, spool: SpoolView | None = None) -> Completeness:
        """See ``completeness.check``."""
        return check(self, "?", self.feed_cursors(), spool)

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
        sql, args = find_sql(query, "?", "rcpt = ? COLLATE NOCASE")
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
        where, args = ["seq > ?"], [seq]
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


_SEAL_COLS = "day, last_seq, records, head, sealed_at, key_id, signature, tsa"


def seal_row(seal: Seal) -> tuple:
    return (seal.day, seal.last_seq, seal.records, seal.head, seal.sealed_at, seal.key_id,
            seal.signature, seal.tsa)


def _row_at(store, mark: str, seq: int) -> tuple | None:
    row = store.query(f"SELECT hash, day FROM audit_records WHERE seq = {mark}", (seq,))
    if not row:
        return None
    first = store.query(f"SELECT first_seq FROM audit_days WHERE day = {mark}", (row[0][1],))
    count = store.query(f"SELECT count(*) FROM audit_records WHERE day = {mark} AND seq <="
                        f" {mark}", (row[0][1], seq))[0][0]
    return (row[0][0], row[0][1], count) if first else None


def _tombstone(row: dict) -> dict:
    new = {c: None for c in RECORD_COLUMNS + EXTRA_COLUMNS if c not in _KEPT_AFTER_PURGE}
    new.update(state=PURGED, cdigest=row["cdigest"], nonce=None, pdigest=None)
    return new
