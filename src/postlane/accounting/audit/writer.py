"""The audit writer: group commit of accounting records into the audit store, in a child
process.

The accounting listener only appends to a queue (a few hundred nanoseconds on the event loop).
A thread gathers what arrived in the last 50 ms (or while the previous batch was written),
turns each record into a tuple and hands the batch to a child process, which hashes, chains and
inserts it in one transaction and answers with the last sequence number. Why a process: in a
thread the hashing and the parameter binding held the GIL for ≈ 25 µs per record, and the
campaign bench lost 8.6 % of its throughput (mean of six on/off pairs, docs/performance.md)
and saw transactional p99 spikes while the thread held the GIL; handing a batch over costs the
node ≈ 2 µs per record.

The thread keeps its own connection to the store for the operations that are not appends
(purges, the operations log, flush points): they run after every record queued before them is
committed. The child gets the store's location over its socket (a DSN can hold a password, so
never on its command line), exits when the socket closes, and if it dies the batch in hand is
sent again to a new child under the same ``BatchKey``, so a batch the dead child had
committed but not yet answered is recognised and not stored twice.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from ...childproc import frame, read_frame, reap
from ...monitor.health import Health
from ..records import Record
from .store import _RECORD_GETTER, AuditStore, BatchKey

__all__ = ["AuditWriter"]

log = logging.getLogger("postlane.audit")

_STOP = object()
_MAX_BATCH = 20000
_CLOSING_TRIES = 3
_WINDOW = 0.05  # seconds a batch gathers: audit records may lag delivery by this much


class _Call:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[AuditStore], object]) -> None:
        self.fn = fn
        self.future: Future = Future()


class _AppendFailed(Exception):
    """The child could not append (database away, disk error): try again later."""


class _ChildGone(Exception):
    """The child process ended: start another and send the batch again."""


def _send(sock: socket.socket, obj: object) -> None:
    sock.sendall(frame(obj))


def _receive(reader) -> object:
    try:
        return read_frame(reader)
    except EOFError:
        raise _ChildGone("the audit writer process ended") from None


class _Child:
    """The appending process and the socket to it (used from the writer thread only)."""

    def __init__(self, location: str, schema: str) -> None:
        mine, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "postlane.accounting.audit.writer",
                 str(theirs.fileno())], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.sock = mine
        self.reader = mine.makefile("rb")
        _send(mine, (location, schema))
        ok, value = _receive(self.reader)
        if not ok:
            self.close()
            raise ConnectionError(value)

    def append(self, batch: list[tuple[tuple, float | None]], key: BatchKey) -> int:
        try:
            _send(self.sock, (key, batch))
            ok, value = _receive(self.reader)
        except OSError as exc:
            raise _ChildGone(str(exc)) from None
        if not ok:
            raise _AppendFailed(value)
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()
        reap(self.proc, 10)


class AuditWriter:
    """Owns the appends to the store at ``location`` (a SQLite file or a PostgreSQL DSN with
    ``schema``). ``sla_of(class)`` is looked up per record so that evidence keeps the SLA that
    applied when the record was written."""

    def __init__(self, location: str | Path, sla_of: Callable[[str], float | None],
                 on_commit: Callable[[int], None] | None = None, *,
                 schema: str = "postlane") -> None:
        self.location = str(location)
        self.schema = schema
        self.sla_of = sla_of
        self.on_commit = on_commit
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closing = threading.Event()
        self._child: _Child | None = None
        self._in_hand = 0  # records of the batch being committed (retried while the store is away)
        self._writer_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(6).hex()}"
        self._batches = itertools.count(1)
        self.health = Health()
        """The node's: the store going away and coming back is told there, once each."""

    @property
    def child_pid(self) -> int | None:
        """The appending process (tests kill it to show that nothing is lost)."""
        return self._child.proc.pid if self._child is not None else None

    @property
    def backlog(self) -> int:
        """Records not yet committed to the store (approximate: read without a lock)."""
        return self._queue.qsize() + self._in_hand

    def add(self, record: Record) -> None:
        """The accounting listener: never blocks, never raises."""
        self._queue.put(record)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def call(self, fn: Callable[[AuditStore], object]) -> Future:
        """Run ``fn(store)`` in the writer thread after the records queued so far are
        committed (purges, and flush points for tests and benchmarks)."""
        item = _Call(fn)
        self._queue.put(item)
        return item.future

    def flush(self, timeout: float | None = None) -> int:
        """Wait until every record added so far is committed; returns the last seq."""
        return self.call(lambda store: store.append(())).result(timeout)

    def close(self) -> None:
        """Write everything still queued, then stop the thread and the child."""
        if self._thread is None:
            return
        self._closing.set()
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        from .backend import open_store_at

        try:
            store = open_store_at(self.location, self.schema)  # creates it before the child
            self._child = _Child(self.location, self.schema)
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        get, get_nowait, sla_of = self._queue.get, self._queue.get_nowait, self.sla_of
        try:
            while True:
                batch = [get()]
                if isinstance(batch[0], Record):
                    # Let a batch gather instead of committing (and waking up) per record:
                    # at a few hundred records/s this took the node's CPU per message from
                    # +15 % to +N % (docs/performance.md, "Audit trail").
                    time.sleep(_WINDOW)
                while len(batch) < _MAX_BATCH:
                    try:
                        batch.append(get_nowait())
                    except queue.Empty:
                        break
                records: list[tuple[tuple, float | None]] = []
                stop = False
                for item in batch:
                    if isinstance(item, Record):
                        records.append((_RECORD_GETTER(item), sla_of(item.cls)))
                        continue
                    self._commit(records)
                    records = []
                    if item is _STOP:
                        stop = True
                        break
                    try:
                        item.future.set_result(item.fn(store))
                    except BaseException as exc:
                        item.future.set_exception(exc)
                self._commit(records)
                if stop:
                    return
        finally:
            store.close()
            if self._child is not None:
                self._child.close()
                self._child = None

    def _commit(self, records: list[tuple[tuple, float | None]]) -> None:
        """Append, retrying until it works: an audit record is never dropped on a disk error or
        while the database is away (the queue grows meanwhile and the error is logged once per
        try). Only a node that is stopping gives up, after ``_CLOSING_TRIES``, so that a store
        gone for good cannot hold the shutdown forever: the records are in the accounting
        files, and the log says how many."""
        if not records:
            return
        key = (self._writer_id, next(self._batches))  # the same on every retry of this batch
        self._in_hand = len(records)
        try:
            self._commit_batch(records, key)
        finally:
            self._in_hand = 0

    def _commit_batch(self, records: list[tuple[tuple, float | None]], key: BatchKey) -> None:
        delay, tries = 0.5, 0
        while True:
            try:
                if self._child is None:
                    self._child = _Child(self.location, self.schema)
                seq = self._child.append(records, key)
                break
            except _ChildGone as exc:
                log.error("audit writer process ended (%s); starting another", exc)
                if self._child is not None:
                    self._child.close()
                    self._child = None
                tries += 1
                if tries == 1:
                    continue  # a new child at once; later failures wait like the others
            except Exception as exc:  # told once, until a write works again
                tries += 1
                self.health.begin("audit", "audit", "audit store unreachable", unit=None,
                                  cause=f"{type(exc).__name__}: {exc}",
                                  effect="records wait in memory and are retried (intake"
                                         " answers 451 once audit.max_backlog are waiting)")
            if self._closing.is_set() and tries >= _CLOSING_TRIES:
                log.error("audit store unreachable at shutdown: %d records not written to"
                          " it (they are in the accounting files)", len(records))
                return
            self._closing.wait(delay)  # a stop cuts the wait short
            delay = min(delay * 2, 30.0)
        self.health.end("audit")
        if self.on_commit is not None:
            self.on_commit(seq)


# -- the child ------------------------------------------------------------------------------------

def _serve(fd: int) -> None:
    from .backend import open_store_at

    sock = socket.socket(fileno=fd)
    reader = sock.makefile("rb")
    try:
        location, schema = _receive(reader)
    except _ChildGone:
        return
    try:
        store = open_store_at(location, schema)
    except Exception as exc:  # noqa: BLE001 - told to the parent, which reports it
        _send(sock, (False, f"{type(exc).__name__}: {exc}"))
        return
    _send(sock, (True, None))
    try:
        while True:
            try:
                key, batch = _receive(reader)
            except _ChildGone:
                return
            try:
                reply = (True, store.append([(Record(*row), sla) for row, sla in batch],
                                            tuple(key)))
            except Exception as exc:  # noqa: BLE001 - the parent logs and retries
                reply = (False, f"{type(exc).__name__}: {exc}")
            _send(sock, reply)
    finally:
        store.close()


if __name__ == "__main__":
    # Ctrl-C reaches the whole process group: the node drains and closes the socket last.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        _serve(int(sys.argv[1]))
