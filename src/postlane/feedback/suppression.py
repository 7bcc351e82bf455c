"""The suppression list: addresses the node must not mail, with a scope, a reason, a time and
an optional expiry.

Scope ``all`` (operator blocks, repeated hard bounces) stops every class; ``best-effort`` (a
hard bounce) stops classes without an SLA; ``marketing`` (complaints, unsubscribes) stops
marketing classes only, so that a customer who unsubscribed from newsletters still receives the
regulatory notices about their policy.

One SQLite table keyed by (address, scope) WITHOUT ROWID: a lookup is one B-tree descent however
long the list is, and a message's recipients are checked in one ``IN (...)`` query; the one
look-up at RCPT (``check_one``) is a prepared statement on the address alone: 17.9 -> 9.0 µs
of CPU for an address with no entry, 27.4 -> 17.5 µs for one with entries
(``benchmarks/suppression_check.py --abba``). An in-memory filter in front of it was built and
measured (7.9 µs absent, 25.9 µs present) and not kept: it needed a rowid on the table (a
migration, a 1.75x larger file) and a change check against other processes' writes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import math
import re
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO, TypeVar

from .. import schema
from ..address import PathError, domain_key, parse_path, spellings
from ..secretfile import private_file

__all__ = ["MIGRATIONS", "SCOPES", "Entry", "SuppressionBusy", "SuppressionError",
           "SuppressionList", "SuppressionOutdated", "adding", "baseline", "normalize",
           "parse_csv", "removing"]

SCOPES = ("all", "best-effort", "marketing")
"""In order of precedence: ``check`` reports the first scope that stops an address."""
CSV_FIELDS = ("address", "scope", "reason", "source", "created", "expires")
_CHUNK = 500  # stays under SQLite's bound-parameter limit
_COLS = "address, scope, reason, source, created, expires"
_Rows = list[tuple[Any, ...]]
"""Rows of ``_COLS`` (named here: inside ``SuppressionList`` ``list`` is its method)."""
_ONE = f"SELECT {_COLS} FROM suppression WHERE address = ?"
_TWO = f"SELECT {_COLS} FROM suppression WHERE address IN (?, ?)"
_IN = f"SELECT {_COLS} FROM suppression WHERE address IN ({{}})"
"""A local part not in ASCII: an entry written before in NFD too (``spellings``)."""
BUSY_TIMEOUT = 0.05
"""Seconds a write waits inside SQLite for the lock before ``write`` sleeps and tries again."""
T = TypeVar("T")


class SuppressionError(ValueError):
    """Bad input to the list (unknown scope, not an address, malformed CSV row)."""


class SuppressionOutdated(RuntimeError):
    """The list is at an older schema version and the opener may not migrate it (a node of the
    previous release may still run on it: migrated under it, its writes would fail)."""


class SuppressionBusy(sqlite3.OperationalError):
    """Another process held the list's write lock for longer than the caller's patience."""


def _busy(exc: sqlite3.OperationalError) -> bool:
    return isinstance(exc, SuppressionBusy) or "locked" in str(exc) or "busy" in str(exc)


@dataclass(slots=True, frozen=True)
class Entry:
    address: str
    scope: str
    reason: str
    source: str  # bounce | complaint | unsubscribe | operator | import
    created: float
    expires: float = 0.0
    """Epoch seconds after which the entry no longer applies; 0: never."""

    def as_dict(self) -> dict[str, Any]:
        return {"address": self.address, "scope": self.scope, "reason": self.reason,
                "source": self.source, "created": self.created,
                "expires": self.expires or None}

    def why(self) -> str:
        """Why and since when, for SMTP replies and "s" records."""
        since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.created))
        until = (time.strftime(", until %Y-%m-%d %H:%M UTC", time.gmtime(self.expires))
                 if self.expires else "")
        return f"{self.scope}, {self.source}, since {since}{until}"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REASON_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def check_reason(reason: str, field: str = "") -> str:
    """Refuse a reason an operator or a file gives that holds a control character (a tab is
    allowed) or a line break: ``suppress list`` prints reasons to a terminal, where ESC or a
    C1 CSI starts an escape sequence, and the export and the audit trail take them as text."""
    if _REASON_CONTROL.search(reason):
        raise SuppressionError(f"{field}{': ' if field else ''}must not contain a control"
                               " character or a line break (NUL, ESC, CR, LF, C1, U+2028 ...;"
                               " a tab is allowed)")
    return reason


def normalize(address: str) -> str:
    """Compare addresses case-insensitively: local parts are case-sensitive in theory, in
    practice no mailbox provider treats them so, and a missed suppression costs more. The
    domain is kept in A-labels (``domain_key``): ``jörg@exämple.com`` and
    ``jörg@xn--exmple-cua.com`` are one mailbox (RFC 5890), and the list compared the text, so
    an entry in one spelling let mail to the other through. The text is in NFC (RFC 6530
    10.1): ``jörg`` precomposed and decomposed were two entries, each stopping one spelling."""
    address = unicodedata.normalize("NFC", address.strip().strip("<>").strip().lower())
    local, _, domain = address.rpartition("@")
    if domain and ("xn--" in domain or not domain.isascii()):
        address = f"{local}@{domain_key(domain)}"
    if len(local) >= 2 and local[0] == local[-1] == '"':  # "john doe"@x: RFC 5321 takes it
        local = local[1:-1].replace(" ", "")
    if ("@" not in address or address.startswith("@") or address.endswith("@")
            or len(address) > 254 or len(f"{local}@{domain}".split()) > 1  # inner white space
            or _CONTROL.search(address)):  # NUL, ESC ...: the SMTP door refuses them too
        raise SuppressionError(f"not an email address: {address!r}")
    return address


def checked(address: str) -> str:
    """``normalize``, and the address must be a path the SMTP door takes (RFC 5321 with
    SMTPUTF8): what an operator or an import file names. ``a@@b.example`` was listed and said
    "suppressed", yet no recipient can ever match it. Look-ups stay with ``normalize``."""
    normal = normalize(address)
    try:
        path, rest = parse_path(normal, utf8=True)
    except PathError as exc:
        raise SuppressionError(f"not an email address: {normal!r} ({exc})") from None
    if rest:
        raise SuppressionError(f"not an email address: {normal!r}")
    return normal


def _scope(scope: str) -> str:
    if scope not in SCOPES:
        raise SuppressionError(f"unknown scope {scope!r} (use one of: {', '.join(SCOPES)})")
    return scope


MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE suppression (
    address TEXT NOT NULL, scope TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '', created REAL NOT NULL,
    PRIMARY KEY (address, scope)) WITHOUT ROWID
"""),
    (2, """
ALTER TABLE suppression ADD COLUMN expires REAL NOT NULL DEFAULT 0;
CREATE TABLE bounces (address TEXT NOT NULL, time REAL NOT NULL, detail TEXT NOT NULL);
CREATE INDEX bounces_address ON bounces (address, time)
"""),
    (3, """
CREATE TABLE pending_records (id INTEGER PRIMARY KEY, data BLOB NOT NULL)
"""),
    (4, """
ALTER TABLE bounces ADD COLUMN queue_id TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX bounces_message ON bounces (address, queue_id) WHERE queue_id <> ''
"""),
]
"""Versioned schema (table ``suppression_migrations``, see ``postlane.schema``): 2 adds entries
that expire and the bounce history behind repeated-evidence suppression; 3 the records of
operators' changes not yet committed to the spool (``recorded``); 4 the message each bounce
was of (``bounced``)."""


def baseline(conn: sqlite3.Connection) -> int:
    """The version of a list written before versions were recorded (0: none yet)."""
    have = schema.columns(conn, "suppression")
    return 0 if not have else 2 if "expires" in have else 1


class SuppressionList:
    """Thread-safe. Reads that the node makes on its event loop (``check``, one indexed query)
    have a connection of their own, so they never wait behind a write; listings open one per
    call. Writes go through a write connection with a short busy timeout and are tried again
    while another process (``postlane suppress import``) holds the database's write lock: for
    ``patience`` seconds in the CLI, for ever in the node's writer thread
    (``suppression_writer.SuppressionWriter``), which keeps them off the event loop."""

    def __init__(self, path: str | Path, patience: float = 30.0, migrate: bool = True) -> None:
        """``migrate`` False: a list at an older schema version is refused
        (``SuppressionOutdated``), not migrated; a new one is still made."""
        self.path = private_file(path)  # addresses: 0600 in a 0700 folder
        self.patience = patience
        with schema.naming(self.path):
            self._open(patience, migrate)

    def _open(self, patience: float, migrate: bool = True) -> None:
        self._wdb = self._connect(BUSY_TIMEOUT)
        self._wlock = threading.Lock()
        # Two nodes (or a node and the CLI) opening a new list at once: switching to WAL
        # fails at once with "database is locked" instead of waiting, so try again.
        for attempt in itertools.count():
            try:
                self._wdb.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt >= 100:
                    raise
                time.sleep(0.05)
        # FULL: a complaint or an unsubscribe is in force once its report is answered; under
        # NORMAL (WAL) a power loss takes the last commits back, and the complainer is mailed
        self._wdb.execute("PRAGMA synchronous=FULL")
        self._wdb.execute(f"PRAGMA busy_timeout={int(patience * 1000)}")
        if not migrate:
            found = schema.version(self._wdb, "suppression_migrations", baseline)
            if 0 < found < MIGRATIONS[-1][0]:
                self._wdb.close()
                raise SuppressionOutdated(f"the suppression list at {self.path} is at schema"
                                          f" version {found} of {MIGRATIONS[-1][0]}")
        schema.migrate(self._wdb, self.path, "suppression_migrations", MIGRATIONS, baseline)
        self._wdb.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
        self._db = self._connect(30)
        self._lock = threading.Lock()

    def _connect(self, timeout: float) -> sqlite3.Connection:
        return sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                               timeout=timeout)

    def close(self) -> None:
        with self._wlock:
            self._wdb.close()
        with self._lock:
            self._db.close()

    def write(self, fn: Callable[[sqlite3.Connection], T], patience: float | None = -1.0) -> T:
        """``fn(connection)`` in one write transaction (``BEGIN IMMEDIATE``: the lock is taken
        first, so a busy database is seen before any work is done, and the work is never half
        done). While another connection holds the lock, try again every few ms, for
        ``patience`` seconds (-1: this list's; None: for ever)."""
        if patience is not None and patience < 0:
            patience = self.patience
        started = time.monotonic()
        pause = 0.005
        while True:
            with self._wlock:
                conn = self._wdb
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        result = fn(conn)
                        conn.execute("COMMIT")
                        return result
                    except BaseException:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        raise
                except sqlite3.OperationalError as exc:
                    if not _busy(exc):
                        raise
            waited = time.monotonic() - started
            if patience is not None and waited >= patience:
                raise SuppressionBusy(f"{self.path}: locked by another process for"
                                      f" {waited:.0f}s") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def add(self, address: str, scope: str, reason: str = "", source: str = "operator",
            when: float | None = None, expires: float = 0.0,
            patience: float | None = -1.0) -> Entry:
        """Add or refresh an entry (the newest reason wins)."""
        entry = self.entry(address, scope, reason, source, when, expires)
        self.add_many([entry], patience)
        return entry

    @staticmethod
    def entry(address: str, scope: str, reason: str = "", source: str = "operator",
              when: float | None = None, expires: float = 0.0) -> Entry:
        """A checked entry (``SuppressionError`` for a bad address or scope); an operator's
        address must be one the SMTP door takes (``checked``)."""
        address = checked(address) if source == "operator" else normalize(address)
        return Entry(address, _scope(scope), reason[:500], source,
                     when if when is not None else time.time(), expires)

    def add_many(self, entries: Iterable[Entry], patience: float | None = -1.0) -> int:
        return self.write(adding(entries), patience)

    def remove(self, address: str, scope: str | None = None,
               patience: float | None = -1.0) -> int:
        """Remove an address from one scope or (scope None) from every scope; returns rows."""
        return self.write(removing(address, scope), patience)

    def recorded(self, change: Callable[[sqlite3.Connection], T],
                 record: Callable[[T], bytes | None],
                 patience: float | None = -1.0) -> tuple[T, int | None]:
        """``change`` (``adding``, ``removing``) and the packed record of it that ``record``
        makes from its result (None: nothing to record) in one transaction: the list and the
        spool are two stores, and a change committed without its record was off the record
        for good when the process died before the spool committed the record. Returns the
        result and the pending record's id, for ``settle`` once the spool holds it; those
        still pending at a start (``pending``) are written to the spool then."""

        def both(conn: sqlite3.Connection) -> tuple[T, int | None]:
            result = change(conn)
            data = record(result)
            if data is None:
                return result, None
            cur = conn.execute("INSERT INTO pending_records (data) VALUES (?)", (data,))
            return result, cur.lastrowid

        return self.write(both, patience)

    def pending(self) -> list[tuple[int, bytes]]:
        """(id, packed record) of changes whose record the spool may not hold yet."""
        with self._lock:
            return [(i, bytes(d)) for i, d in self._db.execute(
                "SELECT id, data FROM pending_records ORDER BY id")]

    def settle(self, ids: Collection[int], patience: float | None = -1.0) -> None:
        """The spool holds these pending records (``recorded``)."""
        ids = list(ids)
        self.write(lambda conn: conn.executemany(
            "DELETE FROM pending_records WHERE id = ?", [(i,) for i in ids]), patience)

    def check(self, addresses: Iterable[str],
              scopes: Collection[str] = SCOPES) -> dict[str, Entry]:
        """The entries in force that stop mail to these addresses in one of ``scopes`` (the
        scopes that apply to the message's class), the first of ``SCOPES`` order for each.
        Keys are the addresses as given."""
        wanted: dict[str, list[str]] = {}
        for addr in addresses:
            try:
                for key in spellings(normalize(addr)):
                    wanted.setdefault(key, []).append(addr)
            except SuppressionError:
                continue
        scopes = [s for s in SCOPES if s in scopes]
        found: dict[str, Entry] = {}
        keys = list(wanted)
        now = time.time()
        with self._lock:
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i: i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT {_COLS} FROM suppression WHERE address IN ({marks})"
                    f" AND scope IN ({','.join('?' * len(scopes))})"
                    " AND (expires = 0 OR expires > ?)", [*chunk, *scopes, now]).fetchall()
                for row in rows:
                    entry = Entry(*row)
                    for original in wanted[entry.address]:
                        held = found.get(original)
                        if held is None or scopes.index(entry.scope) < scopes.index(held.scope):
                            found[original] = entry
        return found

    def check_one(self, address: str) -> Entry | None:
        """``check`` of one address in every scope (the look-up at RCPT): one statement by
        the key's first column, built once, the scopes ordered here."""
        try:
            key = normalize(address)
        except SuppressionError:
            return None
        keys = spellings(key)
        with self._lock:
            rows = self._db.execute(_ONE if len(keys) == 1 else _TWO if len(keys) == 2 else
                                    _IN.format(",".join("?" * len(keys))), keys).fetchall()
        if not rows:
            return None
        now = time.time()
        live = [Entry(*row) for row in rows if row[5] == 0 or row[5] > now]
        return min(live, key=lambda e: SCOPES.index(e.scope)) if live else None

    def data_version(self) -> int:
        """A number that changes whenever anyone (this process's writer, the cluster's sync,
        the CLI) commits to the list: SQLite's ``PRAGMA data_version`` of the reading
        connection, which never writes itself."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def bounced(self, address: str, when: float, window: float, detail: str,
                then: Callable[[int], Entry | None] | None = None, queue_id: str = "",
                patience: float | None = -1.0) -> int:
        """Note a hard bounce of ``address`` as evidence; returns how many it had within
        ``window`` seconds up to ``when`` (older evidence is forgotten). ``then(count)``: the
        entry this count calls for, written in the same transaction. A bounce of a message
        (``queue_id``) already noted is not counted again: a report the node was killed
        before answering is sent again, and a recipient bounced, then delivered again after a
        restart, is bounced again; one mailbox failing once is one piece of evidence."""
        address = normalize(address)

        def note(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM bounces WHERE address = ? AND time <= ?",
                         (address, when - window))
            new = conn.execute("INSERT OR IGNORE INTO bounces (address, time, detail, queue_id)"
                               " VALUES (?, ?, ?, ?)",
                               (address, when, detail[:400], queue_id)).rowcount
            count: int = conn.execute("SELECT COUNT(*) FROM bounces WHERE address = ?",
                                      (address,)).fetchone()[0]
            entry = then(count) if then is not None and new else None
            if entry is not None:
                conn.execute("INSERT OR REPLACE INTO suppression VALUES (?,?,?,?,?,?)",
                             (entry.address, entry.scope, entry.reason, entry.source,
                              entry.created, entry.expires))
            return count

        return self.write(note, patience)

    def list(self, scope: str | None = None, like: str | None = None, limit: int = 100,
             offset: int = 0) -> list[Entry]:
        sql = f"SELECT {_COLS} FROM suppression WHERE (expires = 0 OR expires > ?)"
        args: list[object] = [time.time()]
        if scope is not None:
            sql += " AND scope = ?"
            args.append(_scope(scope))
        if like:
            # * is the one wildcard: % and _ (common in addresses) match themselves. A whole
            # domain in U- or A-labels matches both spellings (entries keep A-labels now,
            # older ones the domain as given).
            local, at, domain = like.lower().rpartition("@")
            patterns = [like.lower()]
            if at and "*" not in domain and ("xn--" in domain or not domain.isascii()):
                patterns = [f"{local}@{spelling.rpartition('@')[2]}"
                            for spelling in spellings(f"x@{domain_key(domain)}")]
            sql += " AND (" + " OR ".join(["address LIKE ? ESCAPE '\\'"] * len(patterns)) + ")"
            args += [re.sub(r"([\\%_])", r"\\\1", p).replace("*", "%") for p in patterns]
        sql += " ORDER BY address, scope LIMIT ? OFFSET ?"
        args += [limit, offset]
        with self._reading() as conn:
            return [Entry(*row) for row in conn.execute(sql, args)]

    def count(self) -> int:
        """Entries in force (a scan: the API calls it in a thread)."""
        with self._reading() as conn:
            count: int = conn.execute("SELECT COUNT(*) FROM suppression WHERE expires = 0"
                                      " OR expires > ?", (time.time(),)).fetchone()[0]
            return count

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A connection of its own for a listing, so a long one never holds up ``check``."""
        conn = self._connect(30)
        try:
            yield conn
        finally:
            conn.close()

    def iter_all(self) -> Iterator[Entry]:
        """Every entry in force, in address order, in pages (an export never holds the lock
        long)."""
        last = ("", "")
        with self._reading() as conn:
            while True:
                rows = self._page(conn, last, 5000)
                if not rows:
                    return
                for row in rows:
                    yield Entry(*row)
                last = (rows[-1][0], rows[-1][1])

    @staticmethod
    def _page(conn: sqlite3.Connection, after: tuple[str, str], size: int) -> _Rows:
        return conn.execute(
            f"SELECT {_COLS} FROM suppression WHERE (address, scope) > (?, ?)"
            " AND (expires = 0 OR expires > ?) ORDER BY address, scope LIMIT ?",
            (*after, time.time(), size)).fetchall()

    def export_page(self, after: tuple[str, str] = ("", ""), size: int = 5000
                    ) -> tuple[str, tuple[str, str] | None]:
        """The CSV rows (no header) of the ``size`` entries in force after ``after`` (address,
        scope) and where the next page starts (None: the last page): the API streams an export
        page by page, so a list of millions is never whole in memory."""
        with self._reading() as conn:
            rows = self._page(conn, after, size)
        out = io.StringIO()
        _write_rows(csv.writer(out), (Entry(*row) for row in rows))
        return out.getvalue(), ((rows[-1][0], rows[-1][1]) if len(rows) == size else None)

    def export_csv(self, out: IO[str]) -> int:
        writer = csv.writer(out)
        writer.writerow(CSV_FIELDS)
        return _write_rows(writer, self.iter_all())

    def import_csv(self, src: TextIO, default_scope: str = "marketing",
                   source: str = "import", patience: float | None = -1.0) -> int:
        """Import rows of address[,scope[,reason[,source[,created[,expires]]]]] (a header line
        naming ``address`` is skipped). All or nothing: one bad row rejects the file, naming its
        line."""
        return self.add_many(parse_csv(src, default_scope, source), patience)


def _write_rows(writer: Any, entries: Iterable[Entry]) -> int:
    """Entries as export rows (``CSV_FIELDS``); how many."""
    n = 0
    for e in entries:
        writer.writerow([e.address, e.scope, e.reason, e.source, f"{e.created:.3f}",
                         f"{e.expires:.3f}" if e.expires else ""])
        n += 1
    return n


def adding(entries: Iterable[Entry]) -> Callable[[sqlite3.Connection], int]:
    """The write that adds (or refreshes) ``entries``; its result: how many."""
    rows = [(e.address, e.scope, e.reason, e.source, e.created, e.expires) for e in entries]

    def add(conn: sqlite3.Connection) -> int:
        conn.executemany("INSERT OR REPLACE INTO suppression VALUES (?,?,?,?,?,?)", rows)
        return len(rows)

    return add


def removing(address: str, scope: str | None = None) -> Callable[[sqlite3.Connection], int]:
    """The write that removes ``address`` from ``scope`` (None: every scope); its result: how
    many entries it removed. A bad address or scope raises here, before any write."""
    keys = spellings(normalize(address))  # an entry written before in U-labels too
    sql = f"DELETE FROM suppression WHERE address IN ({','.join('?' * len(keys))})"
    args: tuple[str, ...] = keys
    if scope is not None:
        sql += " AND scope = ?"
        args = (*keys, _scope(scope))

    def remove(conn: sqlite3.Connection) -> int:
        removed: int = conn.execute(sql, args).rowcount
        return removed

    return remove


def csv_text(data: bytes) -> str:
    """An import file's text: UTF-8 or refused, naming the line (a byte replaced by U+FFFD
    would make an address that suppresses nobody, and the import would say it was done)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SuppressionError(f"line {line}: not UTF-8 (byte {exc.start})") from None


_LAST_TIME = 253402300799.0
"""9999-12-31 23:59:59 UTC: the last time ``time.gmtime`` and the list's dates can show."""


def _unix_time(text: str, what: str) -> float:
    """A time of an import row, in seconds since 1970: a NaN reached SQLite as NULL (its write
    failed on the NOT NULL column and the import never answered), an Infinity could not be
    shown or sent as JSON."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= _LAST_TIME:  # also NaN
        raise SuppressionError(f"{what}: not a Unix time (seconds since 1970, up to the year"
                               f" 9999): {text.strip()!r}")
    return value


def parse_csv(src: TextIO, default_scope: str = "marketing",
              source: str = "import") -> list[Entry]:
    """The entries of an import file (``import_csv``); ``SuppressionError`` names the first
    bad line."""
    entries = []
    now = time.time()
    rows = csv.reader(src)
    try:
        for lineno, row in enumerate(rows, start=1):
            if not row or not row[0].strip() or row[0].startswith("#"):
                continue
            if lineno == 1 and row[0].strip().lower() == "address":
                continue
            try:
                scope = _scope(row[1].strip() if len(row) > 1 and row[1].strip()
                               else default_scope)
                created = _unix_time(row[4], "created") if len(row) > 4 and row[4].strip() \
                    else now
                expires = _unix_time(row[5], "expires") if len(row) > 5 and row[5].strip() \
                    else 0.0
                entries.append(Entry(checked(row[0]), scope,
                                     check_reason(row[2].strip()[:500], "reason") if len(row) > 2
                                     else "",
                                     row[3].strip() if len(row) > 3 and row[3].strip()
                                     else source, created, expires))
            except (SuppressionError, ValueError) as exc:
                raise SuppressionError(f"line {lineno}: {exc}") from None
    except csv.Error as exc:  # e.g. a field over the csv module's 128 KiB limit
        raise SuppressionError(f"line {rows.line_num}: {exc}") from None
    return entries
