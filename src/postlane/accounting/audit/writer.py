"""The audit writer thread: group commit of accounting records into the audit store.

The accounting listener only appends to a queue (a few hundred nanoseconds on the event loop,
and no thread wake-up while the writer gathers a batch); hashing and database work happen in
this thread, one transaction per batch of whatever arrived in the last 50 ms or while the
previous batch was being written. The store (SQLite or PostgreSQL) is opened in this thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from ..records import Record
from .store import AuditStore, SQLiteAuditStore

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


class AuditWriter:
    """Owns the store's write connection. ``store`` opens it (``backend.open_audit_store``), or
    is a SQLite file. ``sla_of(class)`` is looked up per record so that evidence keeps the SLA
    that applied when the record was written."""

    def __init__(self, store: str | Path | Callable[[], AuditStore],
                 sla_of: Callable[[str], float | None],
                 on_commit: Callable[[int], None] | None = None) -> None:
        if callable(store):
            self._open: Callable[[], AuditStore] = store
        else:
            path = Path(store)
            self._open = lambda: SQLiteAuditStore(path)
        self.sla_of = sla_of
        self.on_commit = on_commit
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closing = threading.Event()

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
        """Run ``fn(store)`` in the writer thread after the records queued so far (purges, and
        flush points for tests and benchmarks)."""
        item = _Call(fn)
        self._queue.put(item)
        return item.future

    def flush(self, timeout: float | None = None) -> int:
        """Wait until every record added so far is committed; returns the last seq."""
        return self.call(lambda store: store.append(())).result(timeout)

    def close(self) -> None:
        """Write everything still queued, then stop the thread."""
        if self._thread is None:
            return
        self._closing.set()
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None

    def _run(self) -> None:
        try:
            store = self._open()
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        get, get_nowait = self._queue.get, self._queue.get_nowait
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
                records: list[tuple[Record, float | None]] = []
                stop = False
                for item in batch:
                    if isinstance(item, Record):
                        records.append((item, self.sla_of(item.cls)))
                        continue
                    self._commit(store, records)
                    records = []
                    if item is _STOP:
                        stop = True
                        break
                    try:
                        item.future.set_result(item.fn(store))
                    except BaseException as exc:
                        item.future.set_exception(exc)
                self._commit(store, records)
                if stop:
                    return
        finally:
            store.close()

    def _commit(self, store: AuditStore, records: list[tuple[Record, float | None]]) -> None:
        """Append, retrying until it works: an audit record is never dropped on a disk error or
        while the database is away (the queue grows meanwhile and the error is logged once per
        try). Only a node that is stopping gives up, after ``_CLOSING_TRIES``, so that a store
        gone for good cannot hold the shutdown forever: the records are in the accounting
        files, and the log says how many."""
        if not records:
            return
        delay, tries = 0.5, 0
        while True:
            try:
                seq = store.append(records)
                break
            except Exception:
                tries += 1
                if self._closing.is_set() and tries >= _CLOSING_TRIES:
                    log.error("audit store unreachable at shutdown: %d records not written to"
                              " it (they are in the accounting files)", len(records))
                    return
                log.exception("audit store write failed; retrying in %.1fs", delay)
                self._closing.wait(delay)  # a stop cuts the wait short
                delay = min(delay * 2, 30.0)
        if self.on_commit is not None:
            self.on_commit(seq)
