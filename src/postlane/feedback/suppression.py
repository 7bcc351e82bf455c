"""The suppression list: addresses the node must not mail, with a scope, a reason, a time and
an optional expiry.

Scope ``all`` (operator blocks, repeated hard bounces) stops every class; ``best-effort`` (a
hard bounce) stops classes without an SLA; ``marketing`` (complaints, unsubscribes) stops
marketing classes only, so that a customer who unsubscribed from newsletters still receives the
regulatory notices about their policy.

One SQLite table keyed by (address, scope) WITHOUT ROWID: a lookup is one B-tree descent however
long the list is, and a message's recipients are checked in one ``IN (...)`` query.

In front of it, the node keeps the hashes of the listed addresses in memory (lists of up to
``FILTER_MAX`` entries): a recipient whose hash is not there is not on the list, and the
query is skipped. That is nearly every recipient of a campaign; the query (14 µs, and a GIL
release the spool writer thread could take the event loop's turn in) was 4 % of the node's
profile samples in the bench.
"""

from __future__ import annotations

import csv
import itertools
import re
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .. import schema
from ..secretfile import private_file

__all__ = ["MIGRATIONS", "SCOPES", "Entry", "SuppressionError", "SuppressionList", "baseline",
           "normalize"]

SCOPES = ("all", "best-effort", "marketing")
"""In order of precedence: ``check`` reports the first scope that stops an address."""
CSV_FIELDS = ("address", "scope", "reason", "source", "created", "expires")
_CHUNK = 500  # stays under SQLite's bound-parameter limit
_COLS = "address, scope, reason, source, created, expires"
_SPACE = re.compile(r"\s")  # what str.isspace() is true for
FILTER_MAX = 200_000
"""Lists longer than this are not mirrored in memory (each address costs ~60 bytes there, and
a reload after another process's change reads them all): every check queries."""


class SuppressionError(ValueError):
    """Bad input to the list (unknown scope, not an address, malformed CSV row)."""


@dataclass(slots=True, frozen=True)
class Entry:
    address: str
    scope: str
    reason: str
    source: str  # bounce | complaint | unsubscribe | operator | import
    created: float
    expires: float = 0.0
    """Epoch seconds after which the entry no longer applies; 0: never."""

    def as_dict(self) -> dict:
        return {"address": self.address, "scope": self.scope, "reason": self.reason,
                "source": self.source, "created": self.created,
                "expires": self.expires or None}

    def why(self) -> str:
        """Why and since when, for SMTP replies and "s" records."""
        since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.created))
        until = (time.strftime(", until %Y-%m-%d %H:%M UTC", time.gmtime(self.expires))
                 if self.expires else "")
        return f"{self.scope}, {self.source}, since {since}{until}"


def normalize(address: str) -> str:
    """Compare addresses case-insensitively: local parts are case-sensitive in theory, in
    practice no mailbox provider treats them so, and a missed suppression costs more."""
    address = address.strip().strip("<>").strip().lower()
    if "@" not in address or address.startswith("@") or address.endswith("@") or len(
            address) > 254 or _SPACE.search(address):
        raise SuppressionError(f"not an email address: {address!r}")
    return address


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
]
"""Versioned schema (table ``suppression_migrations``, see ``postlane.schema``): 2 adds entries
that expire and the bounce history behind repeated-evidence suppression."""


def baseline(conn: sqlite3.Connection) -> int:
    """The version of a list written before versions were recorded (0: none yet)."""
    have = schema.columns(conn, "suppression")
    return 0 if not have else 2 if "expires" in have else 1


class SuppressionList:
    """Thread-safe (one connection, one lock): the node uses it from the event loop, the CLI
    and API from their own threads.

    ``recheck``: how often (seconds) ``check`` asks SQLite whether another connection (the
    CLI, another process of the node) changed the list, which reloads the in-memory hashes.
    A change through this object applies at once; another process's within ``recheck``."""

    def __init__(self, path: str | Path, recheck: float = 0.1) -> None:
        self.recheck = recheck
        self._hashes: set[int] | None = None
        """hash() of every listed address (normalized), or None: not loaded, or too many."""
        self._version = -1  # PRAGMA data_version when the hashes were loaded
        self._checked = -1e9  # time.monotonic() of the last data_version look
        self.path = private_file(path)  # addresses: 0600 in a 0700 folder
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._lock = threading.Lock()
        # Two nodes (or a node and the CLI) opening a new list at once: switching to WAL
        # fails at once with "database is locked" instead of waiting, so try again.
        for attempt in itertools.count():
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt >= 100:
                    raise
                time.sleep(0.05)
        self._db.execute("PRAGMA synchronous=NORMAL")
        schema.migrate(self._db, self.path, "suppression_migrations", MIGRATIONS, baseline)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, address: str, scope: str, reason: str = "", source: str = "operator",
            when: float | None = None, expires: float = 0.0) -> Entry:
        """Add or refresh an entry (the newest reason wins)."""
        entry = Entry(normalize(address), _scope(scope), reason[:500], source,
                      when if when is not None else time.time(), expires)
        self.add_many([entry])
        return entry

    def add_many(self, entries: Iterable[Entry]) -> int:
        rows = [(e.address, e.scope, e.reason, e.source, e.created, e.expires) for e in entries]
        with self._lock:
            if self._hashes is not None:  # before the commit: a failed one leaves extra hashes
                self._hashes.update(hash(row[0]) for row in rows)  # (a query, not a miss)
                if len(self._hashes) > FILTER_MAX:
                    self._hashes = None
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR REPLACE INTO suppression VALUES (?,?,?,?,?,?)",
                                     rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(rows)

    def remove(self, address: str, scope: str | None = None) -> int:
        """Remove an address from one scope or (scope None) from every scope; returns rows."""
        address = normalize(address)
        with self._lock:
            if scope is None:
                cur = self._db.execute("DELETE FROM suppression WHERE address = ?", (address,))
            else:
                cur = self._db.execute("DELETE FROM suppression WHERE address = ? AND scope = ?",
                                       (address, _scope(scope)))
            return cur.rowcount

    def check(self, addresses: Iterable[str],
              scopes: Collection[str] = SCOPES) -> dict[str, Entry]:
        """The entries in force that stop mail to these addresses in one of ``scopes`` (the
        scopes that apply to the message's class), the first of ``SCOPES`` order for each.
        Keys are the addresses as given."""
        wanted: dict[str, list[str]] = {}
        for addr in addresses:
            try:
                wanted.setdefault(normalize(addr), []).append(addr)
            except SuppressionError:
                continue
        found: dict[str, Entry] = {}
        if not wanted:
            return found
        scopes = [s for s in SCOPES if s in scopes]
        now = time.time()
        with self._lock:
            hashes = self._current_hashes()
            keys = list(wanted) if hashes is None else [k for k in wanted if hash(k) in hashes]
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

    def _current_hashes(self) -> set[int] | None:
        """The in-memory hashes, reloaded when another connection changed the list since
        (asked at most every ``recheck`` seconds); None when they cannot be used. Called with
        the lock held."""
        now = time.monotonic()
        if now - self._checked < self.recheck:
            return self._hashes
        self._checked = now
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version == self._version:  # (None stays None: too many, until another change)
            return self._hashes
        self._version = version  # (changes after this look bring a new version: no loss)
        self._hashes = None
        if self._db.execute("SELECT COUNT(*) FROM suppression").fetchone()[0] <= FILTER_MAX:
            self._hashes = {hash(a) for (a,) in self._db.execute(
                "SELECT address FROM suppression")}
        return self._hashes

    def bounced(self, address: str, when: float, window: float, detail: str) -> int:
        """Note a hard bounce of ``address`` as evidence; returns how many it had within
        ``window`` seconds up to ``when`` (older evidence is forgotten)."""
        address = normalize(address)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute("DELETE FROM bounces WHERE address = ? AND time <= ?",
                                 (address, when - window))
                self._db.execute("INSERT INTO bounces VALUES (?, ?, ?)",
                                 (address, when, detail[:400]))
                count = self._db.execute("SELECT COUNT(*) FROM bounces WHERE address = ?",
                                         (address,)).fetchone()[0]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return count

    def list(self, scope: str | None = None, like: str | None = None, limit: int = 100,
             offset: int = 0) -> list[Entry]:
        sql = f"SELECT {_COLS} FROM suppression WHERE (expires = 0 OR expires > ?)"
        args: list = [time.time()]
        if scope is not None:
            sql += " AND scope = ?"
            args.append(_scope(scope))
        if like:
            sql += " AND address LIKE ?"
            args.append(like.lower().replace("*", "%"))
        sql += " ORDER BY address, scope LIMIT ? OFFSET ?"
        args += [limit, offset]
        with self._lock:
            return [Entry(*row) for row in self._db.execute(sql, args)]

    def count(self) -> int:
        """Entries in force."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM suppression WHERE expires = 0"
                                    " OR expires > ?", (time.time(),)).fetchone()[0]

    def iter_all(self) -> Iterator[Entry]:
        """Every entry in force, in address order, in pages (an export never holds the lock
        long)."""
        last = ("", "")
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT {_COLS} FROM suppression WHERE (address, scope) > (?, ?)"
                    " AND (expires = 0 OR expires > ?) ORDER BY address, scope LIMIT 5000",
                    (*last, time.time())).fetchall()
            if not rows:
                return
            for row in rows:
                yield Entry(*row)
            last = (rows[-1][0], rows[-1][1])

    def export_csv(self, out: TextIO) -> int:
        writer = csv.writer(out)
        writer.writerow(CSV_FIELDS)
        n = 0
        for e in self.iter_all():
            writer.writerow([e.address, e.scope, e.reason, e.source, f"{e.created:.3f}",
                             f"{e.expires:.3f}" if e.expires else ""])
            n += 1
        return n

    def import_csv(self, src: TextIO, default_scope: str = "marketing",
                   source: str = "import") -> int:
        """Import rows of address[,scope[,reason[,source[,created[,expires]]]]] (a header line
        naming ``address`` is skipped). All or nothing: one bad row rejects the file, naming its
        line."""
        entries = []
        now = time.time()
        for lineno, row in enumerate(csv.reader(src), start=1):
            if not row or not row[0].strip() or row[0].startswith("#"):
                continue
            if lineno == 1 and row[0].strip().lower() == "address":
                continue
            try:
                scope = _scope(row[1].strip() if len(row) > 1 and row[1].strip()
                               else default_scope)
                created = float(row[4]) if len(row) > 4 and row[4].strip() else now
                expires = float(row[5]) if len(row) > 5 and row[5].strip() else 0.0
                entries.append(Entry(normalize(row[0]), scope,
                                     row[2].strip()[:500] if len(row) > 2 else "",
                                     row[3].strip() if len(row) > 3 and row[3].strip()
                                     else source, created, expires))
            except (SuppressionError, ValueError) as exc:
                raise SuppressionError(f"line {lineno}: {exc}") from None
        return self.add_many(entries)
