"""The embedded spool: SQLite in WAL mode, written by one thread with group commit.

Why a writer thread: one fsync per accepted message caps intake at the disk's fsync rate (a few
hundred per second); the writer drains every write that arrived during the previous commit into
one transaction, so thousands of messages share one fsync. Urgent (transactional) writes are taken
before bulk ones, so a campaign's backlog of writes never sits in front of a policy notice.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..accounting.records import Record, pack, unpack
from ..address import address_key
from ..health import Health
from ..schema import NewerSchema, naming
from ..secretfile import private_file, private_open
from .attempts import AttemptJournal
from .base import (
    FINAL_STATES,
    Attempt,
    Message,
    Pending,
    Recipient,
    RecipientUpdate,
    SpoolUnavailable,
    State,
    message_row,
    new_writer_id,
    update_rows,
)
from .cache import BodyCache
from .writer import (
    Batch,
    CommitStats,
    Enqueue,
    Finish,
    GroupCommitWrites,
    Op,
    WriteQueue,
    settle,
)

log = logging.getLogger("postlane.spool")

RUNNING = "spool.running"
"""Beside the spool while a node has it open (its process id); removed by a clean close."""
LOCK = "spool.lock"
"""Locked (``flock``) by the node that has the spool open, for as long as it has it: a second
node on the same folder is refused at start. The kernel drops the lock with the process,
however it ends, so a crash leaves no stale lock behind."""


class SpoolInUse(RuntimeError):
    """Another process has this spool open: two nodes on one SQLite spool would both deliver
    its queue (every message twice) and write one outbox as two writers."""


def _lock(folder: Path) -> int:
    """The spool folder's lock, taken (its file descriptor), or ``SpoolInUse``."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = f"pid {int((folder / RUNNING).read_text().split()[0])}"
        except (OSError, ValueError, IndexError):
            holder = "another process"
        raise SpoolInUse(f"the spool {folder} is open in another node ({holder}): one node"
                         " per spool; stop that one first, or give this one a spool of its"
                         " own") from None
    return fd

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY, cls TEXT NOT NULL, pool TEXT NOT NULL, mail_from TEXT NOT NULL,
    queued_at REAL NOT NULL, deadline REAL NOT NULL, expire_at REAL NOT NULL,
    priority INTEGER NOT NULL, size INTEGER NOT NULL, envid TEXT, ret TEXT,
    correlation_id TEXT, message_id TEXT, listener TEXT, auth_user TEXT, client TEXT);
CREATE TABLE IF NOT EXISTS bodies (id TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS recipients (
    msg_id TEXT NOT NULL, idx INTEGER NOT NULL, address TEXT NOT NULL, domain TEXT NOT NULL,
    orcpt TEXT, notify TEXT, state TEXT NOT NULL, attempts INTEGER NOT NULL,
    next_attempt REAL NOT NULL, last_reply TEXT, PRIMARY KEY (msg_id, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS paused (pool TEXT NOT NULL, domain TEXT NOT NULL,
    PRIMARY KEY (pool, domain));
"""
MIGRATIONS: list[tuple[int, str]] = [
    (2, """
CREATE TABLE events (writer TEXT NOT NULL, n INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (writer, n)) WITHOUT ROWID;
CREATE TABLE writers (writer TEXT PRIMARY KEY, node TEXT NOT NULL, started REAL NOT NULL);
"""),
    (3, """
ALTER TABLE recipients ADD COLUMN pool TEXT NOT NULL DEFAULT '';
ALTER TABLE recipients ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE recipients ADD COLUMN deadline REAL NOT NULL DEFAULT 0;
UPDATE recipients SET (pool, priority, deadline) =
    (SELECT pool, priority, deadline FROM messages WHERE id = msg_id);
CREATE INDEX recipients_lane ON recipients (pool, domain, priority, deadline, msg_id, idx)
    WHERE state = 'queued';
"""),
    (4, """
ALTER TABLE messages ADD COLUMN smtputf8 INTEGER NOT NULL DEFAULT 0;
"""),
    (5, """
ALTER TABLE recipients ADD COLUMN pending TEXT NOT NULL DEFAULT '';
"""),
]
"""Versioned schema after the tables of version 1 (``meta.schema_version``): append
``(n + 1, sql)``; never edit an applied entry."""
SCHEMA_VERSION = MIGRATIONS[-1][0]

_MSG_COLS = ("id, cls, pool, mail_from, queued_at, deadline, expire_at, priority, size, envid, ret,"
             " correlation_id, message_id, listener, auth_user, client, smtputf8")
_UPDATE = ("UPDATE recipients SET state=?, attempts=?, next_attempt=?, last_reply=?"
           " WHERE msg_id=? AND idx=?")
_FINAL = "('delivered', 'bounced', 'expired', 'suppressed')"
assert {f"'{st.value}'" for st in FINAL_STATES} == set(_FINAL[1:-1].split(", "))
ROW = ("SELECT m.id, m.cls, m.pool, m.mail_from, m.queued_at, m.deadline, m.expire_at,"
       " m.priority, m.size, m.envid, m.ret, m.correlation_id, m.message_id, m.listener,"
       " m.auth_user, m.client, r.idx, r.address, r.domain, r.orcpt, r.notify, r.state,"
       " r.attempts, r.next_attempt, r.last_reply, (SELECT count(*) FROM recipients o WHERE"
       f" o.msg_id = r.msg_id AND o.state NOT IN {_FINAL}), m.smtputf8, r.pending"
       " FROM recipients r JOIN messages m ON m.id = r.msg_id")
"""A recipient with its message and the message's recipients not yet final (``paging.py``
turns these rows into objects)."""


WAL_LIMIT = 8 * 1024 * 1024
"""Bytes the write-ahead log is cut back to when it starts over after a checkpoint. SQLite
keeps the file at its largest otherwise: ten 25 MB messages at once left a 185 MB WAL beside
the spool for good (a checkpoint every 1,000 pages keeps it near 4 MB in normal use)."""


def _address_key(address: str) -> str:
    """``address.address_key`` for SQL: never raises (an exception would fail the query)."""
    try:
        return address_key(address)
    except Exception:  # noqa: BLE001 - a stored address the key cannot take: as it is
        return address.lower()


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    # SQLite's lower() folds ASCII only: the spool's selections by recipient compare the
    # key Python computes, as the in-memory matcher does (``JÖRG@EXÄMPLE.com``)
    conn.create_function("address_key", 1, _address_key, deterministic=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
    return conn


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Create the tables, or bring a spool written by an older Postlane up to date."""
    conn.executescript(_SCHEMA)
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    current = int(row[0]) if row else 1
    if current > SCHEMA_VERSION:
        raise NewerSchema(f"{path}: schema version {current} is newer than this Postlane"
                          f" ({SCHEMA_VERSION})")
    for version, sql in MIGRATIONS:
        if version > current:
            conn.executescript(f"BEGIN; {sql}; INSERT OR REPLACE INTO meta VALUES"
                               f" ('schema_version', '{version}'); COMMIT;")


class SQLiteSpool(GroupCommitWrites):
    """Spool in ``<directory>/spool.sqlite``."""

    HEALTH_KEY: ClassVar[str] = "spool"
    JOURNAL_KEY: ClassVar[str] = "attempt-journal"

    def __init__(self, directory: str | Path, node: str = "",
                 health: Health | None = None) -> None:
        self.path = Path(directory) / "spool.sqlite"
        self.node = node
        self.writer_id = new_writer_id(node)
        self.events_written = 0
        """The number of this writer's last committed event."""
        self._cv = threading.Condition()
        self._writes = WriteQueue()
        """Guarded by ``_cv``: the loop queues, the writer thread takes."""
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        """``_reader`` is shared by the threads that read bodies (``load_body``)."""
        self._pager: sqlite3.Connection | None = None
        """Reads of lane pages and queue scans, in threads (``_reader`` serves the loop)."""
        self._pager_lock = threading.Lock()
        self._cache = BodyCache()
        self._attempts = AttemptJournal(self.path.parent)
        self.stats = CommitStats()
        self.health = health if health is not None else Health()
        """Where failing commits are told (the node's; logged once per outage)."""
        self.unclean = False
        """Whether the run before this one ended without closing the spool (a crash, a
        SIGKILL, a power loss): ``RUNNING`` was still there at open."""
        self.backlog = 0
        """Events the audit store and the files had not all taken at open."""
        self._lock_fd: int | None = None

    async def open(self) -> None:
        private_file(self.path)  # message bodies: 0600 in a 0700 folder
        self._lock_fd = _lock(self.path.parent)
        try:
            await self._open()
        except BaseException:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise

    async def _open(self) -> None:
        running = self.path.parent / RUNNING
        self.unclean = running.exists()
        with private_open(running) as fh:
            fh.write(f"{os.getpid()}\n")
        with naming(self.path):
            conn = _connect(self.path)
            try:
                migrate(conn, self.path)
                self.backlog = conn.execute("SELECT count(*) FROM events").fetchone()[0]
                conn.execute("DELETE FROM writers WHERE writer NOT IN"
                             " (SELECT DISTINCT writer FROM events)")
                conn.execute("INSERT INTO writers VALUES (?, ?, ?)",
                             (self.writer_id, self.node, time.time()))

                def unsettled(key: tuple[str, int], attempt: int) -> bool:
                    row = conn.execute(f"SELECT attempts FROM recipients WHERE msg_id=?"
                                       f" AND idx=? AND state NOT IN {_FINAL}", key).fetchone()
                    return row is not None and row[0] < attempt

                self._attempts.open(unsettled)  # the last run's attempts stay until settled
            finally:
                conn.close()
            self._reader = _connect(self.path)
            self._pager = _connect(self.path)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    def _future(self) -> asyncio.Future:
        # The loop the spool opened on: asyncio.get_running_loop() makes a getpid() system call
        # each time (Python 3.11's fork check), 1.8 % of the event loop's samples under the
        # plain-client bench (py-spy --native, 2026-12-07).
        loop = self._loop
        return loop.create_future() if loop is not None else super()._future()

    def mark(self, attempts: list[Attempt], urgent: bool = False) -> asyncio.Future:
        """Journal the attempts (``attempts.py``): written at once, nothing to wait for. A
        journal that cannot be written (the disk full) fails the future with
        ``SpoolUnavailable``: the final dot is not sent, the delivery waits (told once)."""
        fut = self._future()
        try:
            self._attempts.write(attempts)
        except OSError as exc:
            self.health.begin(self.JOURNAL_KEY, "spool", "attempt journal cannot be written",
                              cause=str(exc), unit="deferrals", level=logging.ERROR,
                              effect="deliveries are deferred until it can be (no final dot"
                                     " is sent without its mark)")
            self.health.count(self.JOURNAL_KEY, len(attempts))
            fut.set_exception(SpoolUnavailable(f"attempt journal cannot be written: {exc}"))
            return fut
        self.health.end(self.JOURNAL_KEY)
        fut.set_result(None)
        return fut

    async def close(self) -> None:
        self._attempts.close()
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            conn = _connect(self.path)
            try:  # a clean stop whose events were all consumed leaves no writer behind
                conn.execute("DELETE FROM writers WHERE writer = ? AND NOT EXISTS"
                             " (SELECT 1 FROM events WHERE writer = ?)",
                             (self.writer_id, self.writer_id))
            finally:
                conn.close()
            (self.path.parent / RUNNING).unlink(missing_ok=True)  # a clean stop
        if self._reader:
            with self._read_lock:
                self._reader.close()
            self._reader = None
        if self._pager:
            self._pager.close()
            self._pager = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- writes ---------------------------------------------------------------------------------

    def _submit(self, op: Op, urgent: bool) -> None:
        with self._cv:
            self._writes.put(op, urgent)
            self._cv.notify()

    async def enqueue(self, msg: Message, rcpts: list[Recipient], body: bytes,
                      urgent: bool = False, events: Sequence[Record] = (),
                      finals: Sequence[RecipientUpdate] = ()) -> None:
        """Return once the message, its recipients and ``events`` are committed to disk."""
        fut = self._future()
        row = message_row(msg)
        rrows = [(msg.id, r.idx, r.address, r.domain, r.orcpt, r.notify, r.state.value,
                  r.attempts, r.next_attempt, r.last_reply, msg.pool, msg.priority,
                  msg.deadline) for r in rcpts]
        self._submit(Enqueue(row, (msg.id, body), rrows, events, fut,
                             update_rows(list(finals))), urgent)
        await fut
        self._cache.put(msg.id, body)

    def finish(self, msg_id: str) -> None:
        """Forget a message whose recipients are all final."""
        self._submit(Finish(msg_id), False)
        self._cache.pop(msg_id)

    def _run(self) -> None:
        """The writer thread: commit what is queued, a batch at a time (``writer.py`` says
        what a failed commit does)."""
        conn = _connect(self.path)
        writes = self._writes
        try:
            while True:
                with self._cv:
                    while not writes and not self._stopping:
                        self._cv.wait()
                    if self._stopping and not writes:
                        return
                    ops = writes.take()
                batch = Batch.of(ops)
                error = self._commit(conn, batch)
                if batch.waiters and self._loop is not None:
                    self._loop.call_soon_threadsafe(settle, batch.waiters, error)
                with self._cv:
                    delay = writes.committed(ops, error, self._stopping)
                    refused, writes.refused = writes.refused, []
                if refused and self._loop is not None:
                    self._loop.call_soon_threadsafe(settle, refused, error)
                if delay is None:
                    return
                if delay:  # the spool is failing (disk full? locked?): back off, then retry
                    time.sleep(delay)
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: Batch) -> BaseException | None:
        """Commit one batch in one transaction; the error if it could not be."""
        error: BaseException | None = None
        first = self.events_written + 1
        events = batch.events
        started = time.perf_counter()
        try:
            conn.execute("BEGIN")
            if batch.messages:
                conn.executemany(f"INSERT INTO messages ({_MSG_COLS}) VALUES"
                                 f" ({','.join('?' * 17)})", batch.messages)
                conn.executemany("INSERT INTO bodies VALUES (?, ?)", batch.bodies)
                conn.executemany("INSERT INTO recipients (msg_id, idx, address, domain, orcpt,"
                                 " notify, state, attempts, next_attempt, last_reply, pool,"
                                 " priority, deadline) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                                 batch.recipients)
            updates = batch.updates
            if updates and batch.finished:  # rows this commit deletes need no update first
                gone = set(batch.finished)
                updates = [row for row in updates if row[4] not in gone]
            if updates:
                conn.executemany(_UPDATE, updates)
            if batch.pends:
                conn.executemany("UPDATE recipients SET pending=? WHERE msg_id=? AND idx=?",
                                 batch.pends)
            if events:
                writer = self.writer_id
                conn.executemany("INSERT INTO events VALUES (?, ?, ?)",
                                 [(writer, n, pack(rec))
                                  for n, rec in enumerate(events, first)])
            if batch.finished:
                fins = [(m,) for m in batch.finished]
                conn.executemany("DELETE FROM recipients WHERE msg_id=?", fins)
                conn.executemany("DELETE FROM bodies WHERE id=?", fins)
                conn.executemany("DELETE FROM messages WHERE id=?", fins)
            for writer, n in batch.trims.items():
                conn.execute("DELETE FROM events WHERE writer=? AND n<=?", (writer, n))
                if writer != self.writer_id and not conn.execute(
                        "SELECT 1 FROM events WHERE writer=? LIMIT 1", (writer,)).fetchone():
                    conn.execute("DELETE FROM writers WHERE writer=?", (writer,))
            for pool, domain, paused in batch.pauses:
                if paused:
                    conn.execute("INSERT OR IGNORE INTO paused VALUES (?, ?)", (pool, domain))
                else:
                    conn.execute("DELETE FROM paused WHERE pool=? AND domain=?", (pool, domain))
            conn.execute("COMMIT")
            self.events_written += len(events)
            self.stats.committed(time.perf_counter() - started, len(batch.ops))
            self.health.end(self.HEALTH_KEY)
        except Exception as exc:  # a failed commit must fail every waiter, not hang them
            error = exc
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.health.begin(self.HEALTH_KEY, "spool", "spool writes failing", cause=str(exc),
                              effect="intake answers 451 4.3.0", level=logging.ERROR)
        return error

    # -- reads ----------------------------------------------------------------------------------

    def body(self, msg_id: str) -> bytes:
        """The message's bytes: from the cache of recent messages, else from disk (a query:
        on the event loop, use ``load_body``)."""
        cached = self._cache.get(msg_id)
        if cached is not None:
            return cached
        return self._read_body(msg_id)

    async def load_body(self, msg_id: str) -> bytes:
        """The message's bytes without blocking the loop: from the cache, else read in a
        thread (with 200,000 messages queued most bodies are on disk only)."""
        cached = self._cache.get(msg_id)
        if cached is not None:
            return cached
        return await asyncio.to_thread(self._read_body, msg_id)

    def _read_body(self, msg_id: str) -> bytes:
        assert self._reader is not None
        with self._read_lock:
            row = self._reader.execute("SELECT data FROM bodies WHERE id=?",
                                       (msg_id,)).fetchone()
        if row is None:
            raise KeyError(msg_id)
        return bytes(row[0])

    async def pending(self) -> Pending:
        assert self._reader is not None
        journaled = await asyncio.to_thread(self._attempts.latest)
        out = Pending()
        by_id: dict[str, Message] = {}
        for row in self._reader.execute(f"SELECT {_MSG_COLS} FROM messages ORDER BY queued_at"):
            msg = Message(id=row[0], cls=row[1], pool=row[2], mail_from=row[3], queued_at=row[4],
                          deadline=row[5], expire_at=row[6], priority=row[7], size=row[8],
                          envid=row[9] or "", ret=row[10] or "", correlation_id=row[11] or "",
                          message_id=row[12] or "", listener=row[13] or "",
                          auth_user=row[14] or "", client=row[15] or "",
                          smtputf8=bool(row[16]))
            by_id[msg.id] = msg
            out.messages.append(msg)
        final = tuple(s.value for s in FINAL_STATES)
        for row in self._reader.execute(
                "SELECT msg_id, idx, address, domain, orcpt, notify, state, attempts, next_attempt,"
                " last_reply, pending FROM recipients"
                f" WHERE state NOT IN ({','.join('?' * len(final))})", final):
            owner = by_id.get(row[0])
            if owner is None:
                continue
            state = State(row[6])
            if state is State.INFLIGHT:
                state = State.QUEUED
            owner.remaining += 1
            out.recipients.append(Recipient(
                msg=owner, idx=row[1], address=row[2], domain=row[3], orcpt=row[4] or "",
                notify=row[5] or "", state=state, attempts=row[7], next_attempt=row[8],
                last_reply=row[9] or "", open_attempt=_unsettled(journaled, row),
                pending=row[10]))
        for msg in out.messages:
            if not msg.remaining:  # crashed between the last outcome and the cleanup
                self.finish(msg.id)
        out.messages = [m for m in out.messages if m.remaining]
        return out

    # -- paged reads (the lanes keep their heads in memory, the rest stays here) ----------------

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        assert self._pager is not None
        with self._pager_lock:
            return self._pager.execute(sql, params).fetchall()

    async def page(self, pool: str, domain: str, after: tuple, limit: int) -> list[tuple]:
        """The next ``limit`` queued recipients of a lane after ``after`` (priority, deadline,
        queue id, index) in the lane's order, as ``ROW`` rows (index ``recipients_lane``)."""
        return await asyncio.to_thread(
            self._read, f"{ROW} WHERE r.pool = ? AND r.domain = ? AND r.state = 'queued' AND"
            " (r.priority, r.deadline, r.msg_id, r.idx) > (?, ?, ?, ?)"
            " ORDER BY r.priority, r.deadline, r.msg_id, r.idx LIMIT ?",
            (pool, domain, *after, limit))

    async def scan(self, where: str = "", params: tuple = ()) -> list[tuple]:
        """Recipients not yet final as ``ROW`` rows, with an extra condition on ``r`` (the
        recipient) and ``m`` (its message): the operator's views of a deep queue."""
        extra = f" AND ({where})" if where else ""
        return await asyncio.to_thread(
            self._read, f"{ROW} WHERE r.state NOT IN {_FINAL}{extra}", params)

    async def resume(self, sla_classes: Sequence[str] = ()) -> Resumed:
        """What a restart needs when lanes page: every recipient not final and not queued
        (deferred, held) as ``ROW`` rows, the queued ones counted per lane and second, and the
        queue per class for the monitor (messages of ``sla_classes`` one by one)."""
        def read() -> Resumed:
            out = Resumed()
            for (msg_id,) in self._read(
                    "SELECT id FROM messages m WHERE NOT EXISTS (SELECT 1 FROM recipients r"
                    f" WHERE r.msg_id = m.id AND r.state NOT IN {_FINAL})"):
                out.finished.append(msg_id)  # crashed between the last outcome and the cleanup
            # a queued recipient with an operator's action pending comes in now, to have it
            # applied (``Scheduler.add``), and is not counted among its lane's spooled ones
            out.rows = self._read(f"{ROW} WHERE r.state NOT IN {_FINAL} AND"
                                  " (r.state != 'queued' OR r.pending != '')")
            out.lanes = self._read(
                "SELECT r.pool, r.domain, CAST(m.queued_at AS INTEGER), count(*),"
                " min(m.queued_at) FROM recipients r JOIN messages m ON m.id = r.msg_id"
                " WHERE r.state = 'queued' AND r.pending = '' GROUP BY r.pool, r.domain, 3")
            out.classes = dict(self._read(
                "SELECT m.cls, count(*) FROM recipients r JOIN messages m ON m.id = r.msg_id"
                f" WHERE r.state NOT IN {_FINAL} GROUP BY m.cls"))
            if sla_classes:
                out.outstanding = self._read(
                    "SELECT m.cls, m.id, m.queued_at, count(*) FROM recipients r JOIN messages m"
                    f" ON m.id = r.msg_id WHERE r.state NOT IN {_FINAL} AND m.cls IN"
                    f" ({','.join('?' * len(sla_classes))}) GROUP BY m.id ORDER BY m.queued_at",
                    tuple(sla_classes))
            out.journaled = self._attempts.latest()
            return out

        out = await asyncio.to_thread(read)
        for msg_id in out.finished:
            self.finish(msg_id)
        return out

    async def paused(self) -> set[tuple[str, str]]:
        assert self._reader is not None
        return {(p, d) for p, d in self._reader.execute("SELECT pool, domain FROM paused")}

    async def has_event(self, data: bytes) -> bool:
        assert self._reader is not None
        return self._reader.execute("SELECT 1 FROM events WHERE data = ? LIMIT 1",
                                    (data,)).fetchone() is not None

    async def events_naming(self, text: str) -> list[Record]:
        assert self._reader is not None
        return [Record(*unpack(data)) for (data,) in self._reader.execute(
            "SELECT data FROM events WHERE instr(data, ?) > 0", (text.encode(),))]


@dataclass(slots=True)
class Resumed:
    """A restart's view of the spool when lanes page (``SQLiteSpool.resume``)."""

    rows: list[tuple] = field(default_factory=list)
    lanes: list[tuple] = field(default_factory=list)
    """(pool, domain, second, queued recipients, earliest injection time in that second)"""
    classes: dict[str, int] = field(default_factory=dict)
    outstanding: list[tuple] = field(default_factory=list)
    """(class, queue id, injection time, recipients not final), oldest first"""
    journaled: dict = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)


def _unsettled(journaled: dict, row: tuple) -> Attempt | None:
    """The journaled attempt of a recipient row whose outcome the spool never got (the journal
    names a later attempt than the row has counted)."""
    last = journaled.get((row[0], row[1]))
    return last[1] if last is not None and last[0] > row[7] else None

