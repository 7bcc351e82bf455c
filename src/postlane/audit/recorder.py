"""The recorder: feeds the audit store and the accounting files from the spool's events.

Every accounting record is written into the spool as an *event*, in the same transaction as the
state change it describes (accepted, delivered, deferred, bounced, expired, suppressed …), so a
record exists exactly when its fact does. The recorder, a child process the node starts, reads
the events back (``spool.outbox``) and writes them on, each consumer with a durable cursor of its
own, so a crash at any moment neither loses nor doubles a record:

- the audit store keeps each writer's last event number in the same transaction as the chained
  records (``AuditStore.append`` skips events it holds);
- the accounting files keep theirs in a position file, written after each fsync, and cut the
  files back to it after a crash (``AccountingLog``); in a cluster each position is committed
  to the database first, with ``writers.filed`` (where a node adopting a dead node's events
  goes on from), and the newer of the two is the files' position.

The node trims the events both consumers have (the spool keeps one writer). Why a process: the
hashing, the index inserts and the file formatting cost the node ≈ 30 µs per record in its own
process (docs/performance.md, "Cost of audit writing"); here they run on the other core.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import marshal
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..accounting.log import AccountingLog
from ..accounting.records import Record, unpack
from ..childproc import HEAD, frame, read_frame, reap
from ..spool.hold import held

if TYPE_CHECKING:
    from ..config import Config
    from ..health import Health
    from ..spool import Spool

__all__ = ["Recorder"]

log = logging.getLogger("postlane.recorder")

POLL = 0.05
"""Seconds between looks at the outbox when it is quiet: records reach the store and the
webhooks this long after their fact, at most (plus the write)."""
SYNC = 1.0
"""Seconds between fsyncs of the accounting files (and moves of their position)."""
BATCH = 20000
"""Events read per writer and look: one audit transaction at most this big."""
STEADY = 10.0
"""Seconds a recorder child has to live for its end to count as a one-off (restarted at once);
the second quick end in a row waits 1 s, then 2, 4 ... up to ``RESTART_MAX``."""
RESTART_MAX = 60.0
NICE = 5
"""The recorder runs this much nicer than the node: when the cores are short, the mail path
(the event loop, the spool writer, the signers) goes first and the evidence follows a little
later - it is already durable as events in the spool, and intake slows down if the recorder
falls far behind (``Recorder.behind``)."""


def _settings(config: Config, own: str, audit: str | None) -> dict:
    acc = config.accounting
    return {"spool": config.node.spool, "schema": config.cluster.schema_name, "own": own,
            "dead_after": config.cluster.dead_after, "audit": audit,
            "acct": {"directory": str(acc.directory), "formats": list(acc.formats),
                     "fields": list(acc.fields), "rotate": acc.rotate,
                     "rotate_size": acc.rotate_size},
            "sla": {name: c.sla for name, c in config.classes.items()}}


class Recorder:
    """The node's side: starts the child, replaces it if it dies, trims what it consumed."""

    def __init__(self, config: Config, spool: Spool, audit: str | None,
                 on_stored: Callable[[], None] | None = None,
                 health: Health | None = None) -> None:
        self.config = config
        self.health = health
        """Where the child's degraded states (store or spool unreadable) are told."""
        self.spool = spool
        self.audit = audit
        """The audit store's location (None: audit disabled, files only)."""
        self.on_stored = on_stored
        """Called when records reached the store (the webhooks wake up)."""
        self.stored: dict[str, int] = {}
        """Each writer's last event in the audit store, as the child last said."""
        self.filed: dict[str, int] = {}
        """Each writer's last event in the (synced) accounting files."""
        self._proc: subprocess.Popen | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._flushes: dict[int, asyncio.Future] = {}
        self._tokens = itertools.count(1)
        self._ready: asyncio.Future | None = None
        self._stopping = False
        self._stop_asked = asyncio.Event()
        """Set by ``stop``: cuts a restart pause short."""
        self._restarter: asyncio.Task | None = None
        """The task starting a child after one died (a stop waits for it and its last child)."""
        self._behind = False
        self._started = 0.0
        """When the running child was ready (``time.monotonic``)."""
        self._quick_deaths = 0
        """Children in a row that ended within ``STEADY`` seconds of their start."""

    @property
    def child_pid(self) -> int | None:
        """The recorder process (tests kill it to show that nothing is lost)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def backlog(self) -> int:
        """This node's events not yet in the audit store (the files, if audit is off)."""
        done = (self.stored if self.audit else self.filed).get(self.spool.writer_id, 0)
        return max(0, self.spool.events_written - done)

    def behind(self) -> bool:
        """Whether more events wait for the audit store than ``audit.max_backlog`` (intake
        refuses new mail meanwhile); logged when it starts and once the store has caught up
        to half."""
        if not self.audit:
            return False
        backlog = self.backlog
        limit = self.config.audit.max_backlog
        if not self._behind and backlog > limit:
            self._behind = True
            log.error("audit store %d records behind (audit.max_backlog %d): refusing new mail"
                      " with 451 until it catches up", backlog, limit)
        elif self._behind and backlog <= limit // 2:
            self._behind = False
            log.warning("audit store caught up (%d records behind): accepting mail again",
                        backlog)
        return self._behind

    @property
    def pid(self) -> int | None:
        """The child's process id (None before it started)."""
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the child; raises if it cannot open the store or the files."""
        await self._spawn()

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        # a new one before the child is there: ``child_pid`` never names a child that
        # ``_ready`` (the last child's, done) says is ready
        self._ready = loop.create_future()
        mine, theirs = socket.socketpair()
        try:
            self._proc = proc = await asyncio.to_thread(  # fork and exec off the loop
                subprocess.Popen,
                [sys.executable, "-m", "postlane.audit.recorder", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_connection(sock=mine)
        self._writer.write(frame(_settings(self.config, self.spool.writer_id, self.audit)))
        self._reader_task = loop.create_task(self._read(reader, proc))
        try:
            await self._ready
        except BaseException:
            await self._reap()
            raise
        self._started = time.monotonic()
        for token in self._flushes:  # asked of a child that died: ask the new one
            self._writer.write(frame(("flush", token)))

    async def _read(self, reader: asyncio.StreamReader, proc: subprocess.Popen) -> None:
        try:
            while True:
                head = await reader.readexactly(HEAD.size)
                msg = marshal.loads(await reader.readexactly(HEAD.unpack(head)[0]))
                self._handle(msg)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ConnectionError("the recorder process ended at start"))
            return
        if self._ready is not None and not self._ready.cancelled() and \
                self._ready.exception() is not None:
            return  # it said why it could not start: the start fails with that, no restart
        if self._stopping or proc is not self._proc:
            return
        self._restarter = asyncio.current_task()
        try:
            await self._restart(proc)
        finally:
            self._restarter = None

    async def _restart(self, proc: subprocess.Popen) -> None:
        """Start another child after ``proc`` died (after a pause if they keep dying)."""
        code = await asyncio.to_thread(proc.wait)
        # A child that keeps dying soon after its start (a full disk, a store it cannot write)
        # is restarted after a growing pause, not in a loop of process starts; the events wait
        # in the spool meanwhile, and intake says 451 once they exceed audit.max_backlog.
        quick = time.monotonic() - self._started < STEADY
        self._quick_deaths = self._quick_deaths + 1 if quick else 0
        delay = min(RESTART_MAX, 2.0 ** (self._quick_deaths - 2)) if self._quick_deaths > 1 else 0
        log.error("recorder process ended (exit %s); starting another%s", code,
                  f" in {delay:g}s" if delay else "")
        # A stop meanwhile cuts the pause short and still starts one: the node's last records
        # are written before it ends (it used to wait the pause out and end with them in the
        # spool only, neither in the files nor in the store until a next start).
        await self._pause(delay)
        while True:
            try:
                await self._spawn()
            except Exception as exc:  # noqa: BLE001 - the events wait in the spool meanwhile
                if self._stopping:
                    log.error("cannot start the recorder to write the last records (%s): they"
                              " wait in the spool for the next start", exc)
                    return
                log.error("cannot start the recorder: %s; retrying in 5s", exc)
                await self._pause(5)
                continue
            if self._stopping:  # started for the stop: it writes what the spool holds, ends
                await self._last(self._writer, self._reader_task)
            return

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if a stop is asked meanwhile."""
        if seconds and not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_asked.wait(), seconds)

    @staticmethod
    async def _last(writer: asyncio.StreamWriter | None, reader: asyncio.Task | None) -> None:
        """Tell a child to write what the spool holds and end; wait (60 s at most) for it."""
        if writer is not None:
            with contextlib.suppress(ConnectionError):
                writer.write(frame(("stop", None)))
                await writer.drain()
        if reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(reader), 60)

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            assert self._ready is not None
            self._ready.set_result(None)
        elif kind == "error":
            assert self._ready is not None
            self._ready.set_exception(ConnectionError(msg[1]))
        elif kind == "progress":
            stored, filed = msg[1], msg[2]
            grew = stored != self.stored
            self.stored, self.filed = stored, filed
            consumed = {w: min(n, stored.get(w, 0)) if self.audit else n
                        for w, n in filed.items()}
            state = getattr(self.spool, "path", None)  # an SQLite spool's file
            if consumed and not (state is not None and held(state.parent)):  # (a backup runs)
                self.spool.trim(consumed)
            if grew and self.on_stored is not None:
                self.on_stored()
        elif kind == "log":  # the child's log lines join the node's (one stream, one format)
            log.log(msg[1], "%s", msg[2])
        elif kind == "degraded" and self.health is not None:
            key, what, cause, effect = msg[1:]
            self.health.begin(key, "audit", what, cause=cause, effect=effect, unit=None,
                              level=logging.ERROR)
        elif kind == "recovered" and self.health is not None:
            self.health.end(msg[1])
        elif kind == "flushed":
            fut = self._flushes.pop(msg[1], None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def flush(self) -> None:
        """Wait until every event committed to the spool so far is in the audit store and in
        the (fsynced) accounting files. The caller flushes the spool first."""
        token = next(self._tokens)
        fut = asyncio.get_running_loop().create_future()
        self._flushes[token] = fut
        assert self._writer is not None
        self._writer.write(frame(("flush", token)))
        await fut

    async def stop(self) -> None:
        """Let the child write what the spool holds, then end it (one waiting out a restart
        pause is started at once for that)."""
        self._stopping = True
        self._stop_asked.set()
        restarter = self._restarter
        if restarter is not None:  # a child died: the one started for the stop files the rest
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(restarter), 90)
        if self._writer is not None:
            with contextlib.suppress(ConnectionError):
                self._writer.write(frame(("stop", None)))
                await self._writer.drain()
        await self._reap()

    async def _reap(self) -> None:
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._reader_task), 60)
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._proc is not None:
            await asyncio.to_thread(reap, self._proc, 10)


# -- the child ------------------------------------------------------------------------------------

class _Feed:
    """What the child feeds: the store (optional) and the files, each with its cursors."""

    def __init__(self, settings: dict, tell: Callable[[tuple], None]) -> None:
        from ..spool.outbox import PostgresOutbox, open_outbox

        self.tell = tell
        """Sends a frame to the node (degraded states go to its Health)."""
        self.sla: dict[str, float | None] = settings["sla"]
        self.outbox = open_outbox(settings["spool"], settings["schema"], settings["own"],
                                  settings["dead_after"])
        self.node = settings["own"].rsplit("/", 1)[0]
        acc = settings["acct"]
        # in a cluster the files' position is committed with ``writers.filed`` (where an
        # adopter of this node's events goes on from) before it is written beside them
        clustered = isinstance(self.outbox, PostgresOutbox)
        self.files = AccountingLog(
            Path(acc["directory"]), formats=acc["formats"], fields=acc["fields"],
            rotate_seconds=acc["rotate"], rotate_bytes=acc["rotate_size"],
            commit=self._commit_position if clustered else None,
            published=self.outbox.position(self.node)
            if isinstance(self.outbox, PostgresOutbox) else None)
        self.filed: dict[str, int] = dict(self.files.feed)  # written (synced when durable)
        self.store = None
        self.stored: dict[str, int] = {}
        if settings["audit"]:
            from ..audit.backend import open_store_at

            self.store = open_store_at(settings["audit"], settings["schema"])
            self.stored = self.store.feed_cursors()
        self._settings = settings
        self._known: set[str] = set()
        self.dirty = False
        self._outbox_down = False
        self._store_down = False
        self._store_retry = 0.0
        self._store_delay = 0.5
        self._files_down = False
        self._files_retry = 0.0
        self._files_delay = 0.5
        self._adopted: dict[str, int] = {}
        """Where adopted writers' files got to (their own recorder's published position)."""
        if self.files.open_error is not None:  # a full disk at start: degraded, not dead
            self._files_failed(self.files.open_error)
        lost = dict(self.files.lost)
        self._write_lost()
        # this recorder's files had them: the position published in a cluster (from before
        # the loss) must not skip the lines being written again
        self._known.update(lost)

    def _commit_position(self, position: dict) -> None:
        """The files' position and ``writers.filed`` to the cluster's database (its outbox
        may have been opened again since)."""
        from ..spool.outbox import PostgresOutbox

        if not isinstance(self.outbox, PostgresOutbox):
            raise TypeError("the accounting position is committed only in a cluster")
        self.outbox.commit_position(self.node, position)

    def _write_lost(self) -> bool:
        """Write again the events ``files.lost`` names: at the start, and after a failed write
        (the disk full) put them back with the files' last sync. False if the files cannot be
        written now (tried again at a later ``pump``, before any other event of theirs)."""
        for writer, (first, last) in list(self.files.lost.items()):
            if not self._write_again(writer, first, last):
                return False
        return True

    def _write_again(self, writer: str, first: int, last: int) -> bool:
        """Write again the lines of events ``first..last`` a torn file lost: from the spool
        if it still has them (the next ``pump`` does), else from the audit store."""
        rows = self.outbox.read(writer, first - 1, 1)
        if rows and rows[0][0] == first:
            log.warning("accounting files: events %s#%d..%d written again from the spool",
                        writer, first, last)
            self.filed[writer] = first - 1
            self.files.lost.pop(writer)
            return True
        found = self.store.records_of(writer, first, last) if self.store is not None else []
        done = first - 1
        for n, _ in found:
            if n != done + 1:
                break
            done = n
        if done >= first:
            try:
                self.files.write_events(writer, found[:done - first + 1])
            except OSError as exc:  # the disk full: the files are back at their last sync,
                self._files_failed(exc)  # and ``files.lost`` with them
                return False
            self.filed[writer] = done
            self.dirty = True
        rest = self.outbox.read(writer, done, 1) if done < last else []
        if done == last or (rest and rest[0][0] == done + 1):  # the spool has the rest
            log.warning("accounting files: events %s#%d..%d written again from the audit store"
                        "%s", writer, first, done, " and the spool" if done < last else "")
        else:
            log.error("accounting files: the lines of events %s#%d..%d are lost (neither the"
                      " spool nor the audit store has them)", writer, done + 1, last)
            self.filed[writer] = last
            self.dirty = True
        self.files.lost.pop(writer)  # the next sync's position says so
        return True

    def pump(self) -> int:
        """Feed what the outbox holds beyond each cursor (one batch per writer and consumer);
        returns how many events were taken."""
        taken = 0
        entries: list[tuple] = []
        now = time.monotonic()
        files_due = now >= self._files_retry
        store_due = self.store is not None and now >= self._store_retry
        if files_due and self.files.lost and not self._write_lost():
            files_due = False
        for writer in self.outbox.writers():
            if writer not in self._known:  # adopted from a node that is gone: go on from
                self._known.add(writer)    # where its own recorder's files got to
                published = getattr(self.outbox, "filed", None)
                if published is not None:
                    self._adopted[writer] = published(writer)
                    self.filed[writer] = max(self.filed.get(writer, 0), self._adopted[writer])
                    # recorded at the next sync (the progress the spool trims by): with
                    # nothing left to file it never synced, and the dead node's records
                    # stayed in the outbox until this node filed records of its own
                    if self.filed[writer] > self.files.feed.get(writer, 0):
                        self.dirty = True
            filed = self.filed.get(writer, 0)
            rows: list | None = None
            values: list[tuple] = []
            if files_due:
                rows = self.outbox.read(writer, filed, BATCH)
                values = [unpack(data) for _, data in rows]
                if rows and self._file(writer, rows, values):
                    self.filed[writer] = rows[-1][0]
                    self.dirty = True
                    taken += len(rows)
                elif rows:
                    files_due = False
            if not store_due:
                continue
            stored = self.stored.get(writer, 0)
            if rows is None or stored != filed:  # the store is ahead or behind: its own read
                rows = self.outbox.read(writer, stored, BATCH)
                values = [unpack(data) for _, data in rows]
            if rows and rows[0][0] > stored + 1:
                stored = self._stored_by_anyone(writer, stored)
            if rows and rows[0][0] > stored + 1:
                log.error("evidence gap: events %s#%d..%d are not in the spool's outbox;"
                          " audit verify will name them", writer, stored + 1, rows[0][0] - 1)
            entries.extend((v, self.sla.get(v[6]), writer, n)
                           for (n, _), v in zip(rows, values, strict=True))
        if entries:
            self._append(entries)
            taken += len(entries)
        return taken

    def _stored_by_anyone(self, writer: str, stored: int) -> int:
        """The store's own cursor for ``writer`` when it is ahead of this recorder's: in a
        cluster, a dead node's recorder stored (and its spool trimmed) events before this one
        adopted the writer, which is no gap. On a store error, ``stored``: ``_append`` tells."""
        assert self.store is not None
        try:
            ahead = self.store.feed_cursors().get(writer, 0)
        except Exception:  # noqa: BLE001 - the append that follows meets it and says so
            return stored
        if ahead > stored:
            self.stored[writer] = ahead
        return max(stored, ahead)

    def _file(self, writer: str, rows: list, values: list[tuple]) -> bool:
        """Write the records of events ``rows`` of ``writer`` into the files; False if they
        cannot be written (the disk full): the files and ``filed`` go back to the last sync
        and are written again later."""
        try:
            self.files.write_events(writer, [(n, Record(*v)) for (n, _), v in
                                             zip(rows, values, strict=True)])
        except OSError as exc:
            self._files_failed(exc)
            return False
        return True

    def _files_failed(self, exc: OSError) -> None:
        """The files are back at their last sync (``AccountingLog``): so is ``filed``. Told
        once; tried again after a pause that doubles up to 30 s."""
        self.filed = {w: max(self.files.feed.get(w, 0), self._adopted.get(w, 0))
                      for w in self.filed}
        self.dirty = False
        if not self._files_down:
            self._files_down = True
            self.tell(("degraded", "accounting", "accounting files write failed",
                       f"{type(exc).__name__}: {exc}", "records wait in the spool and are"
                       " written to the files once they can be (deliveries go on)"))
        self._files_retry = time.monotonic() + self._files_delay
        self._files_delay = min(self._files_delay * 2, 30.0)

    @property
    def files_down(self) -> bool:
        """The files cannot be written: ``sync`` tries again when its pause is over."""
        return self._files_down

    def safe_pump(self) -> int:
        """``pump``, surviving an outbox that cannot be read (the database away): the events
        wait there; logged once when it starts and once when it ends."""
        try:
            taken = self.pump()
        except Exception as exc:  # noqa: BLE001 - retried at the next look
            if not self._outbox_down:
                self._outbox_down = True
                self.tell(("degraded", "recorder-outbox", "spool events unreadable",
                           f"{type(exc).__name__}: {exc}", "records wait in the spool and are"
                           " written to the audit store and files once it can be read"))
            self._reopen_outbox()
            time.sleep(1.0)
            return 0
        if self._outbox_down:
            self._outbox_down = False
            self.tell(("recovered", "recorder-outbox"))
        return taken

    def _reopen_outbox(self) -> None:
        from ..spool.outbox import open_outbox

        with contextlib.suppress(Exception):
            self.outbox.close()
        with contextlib.suppress(Exception):
            self.outbox = open_outbox(self._settings["spool"], self._settings["schema"],
                                      self._settings["own"], self._settings["dead_after"])

    def _append(self, entries: list[tuple]) -> None:
        assert self.store is not None
        try:
            self.store.append(entries)
        except Exception as exc:  # noqa: BLE001 - the events wait in the spool; try again
            if not self._store_down:
                self._store_down = True
                self.tell(("degraded", "audit", "audit store write failed",
                           f"{type(exc).__name__}: {exc}", "records wait in the spool and are"
                           " written once it works again (intake answers 451 once"
                           " audit.max_backlog wait)"))
            self._store_retry = time.monotonic() + self._store_delay
            self._store_delay = min(self._store_delay * 2, 30.0)
            return
        if self._store_down:
            self._store_down = False
            self.tell(("recovered", "audit"))
        self._store_delay = 0.5
        for _, _, writer, n in entries:
            self.stored[writer] = n

    def sync(self, last: bool = False) -> None:
        """Make the files durable up to ``filed`` (while they fail, only when a retry is due,
        or ``last``)."""
        if self._files_down and not last and time.monotonic() < self._files_retry:
            return
        try:
            self.files.sync(self.filed)
        except OSError as exc:
            self._files_failed(exc)
            return
        self.dirty = False
        if self._files_down:
            self._files_down = False
            self._files_delay = 0.5
            self.tell(("recovered", "accounting"))

    def progress(self) -> tuple:
        return ("progress", dict(self.stored), dict(self.files.feed))

    def close(self) -> None:
        self.sync(last=True)  # the files hold exactly the events ``filed`` names: record that
        self.files.close()
        self.outbox.close()
        if self.store is not None:
            self.store.close()


class _ToNode(logging.Handler):
    """Sends the child's log records to the node, which logs them as its own."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(frame(("log", record.levelno, record.getMessage())))


def _hold_files(directory: Path) -> int:
    """Lock the accounting folder for this process's life (the kernel drops the lock when it
    ends, killed or not). A recorder whose node was SIGKILLed goes on until it sees the node
    gone, and then writes its unsynced lines and its position; the restarted node's recorder
    waits for that, rather than cut the files back under it and write the same records again."""
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.warning("waiting for the previous recorder process to finish writing the"
                    " accounting files in %s", directory)
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _serve(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    logging.getLogger().addHandler(_ToNode(sock))
    reader = sock.makefile("rb")
    try:
        settings = read_frame(reader)
    except EOFError:
        return
    try:
        _hold_files(Path(settings["acct"]["directory"]))  # held until this process ends
        feed = _Feed(settings, lambda msg: sock.sendall(frame(msg)))
    except Exception as exc:  # noqa: BLE001 - told to the node, which reports it
        sock.sendall(frame(("error", f"{type(exc).__name__}: {exc}")))
        return
    sock.sendall(frame(("ready", None)))
    # In a cluster, a survivor goes on from the position this recorder commits: sync each
    # batch, so that a node that dies for good leaves at most one batch the survivor repeats.
    every = 0.0 if settings["spool"].startswith(("postgresql://", "postgres://")) else SYNC
    last_sync, last_progress = time.monotonic(), None
    flushes: list[int] = []
    stopping = False
    try:
        while True:
            taken = feed.safe_pump()
            if flushes or stopping:
                while taken:
                    taken = feed.safe_pump()
                feed.sync()
            elif (feed.dirty or feed.files_down) and time.monotonic() - last_sync >= every:
                feed.sync()
                last_sync = time.monotonic()
            progress = feed.progress()
            if progress != last_progress:
                sock.sendall(frame(progress))
                last_progress = progress
            for token in flushes:
                sock.sendall(frame(("flushed", token)))
            flushes.clear()
            if stopping:
                return
            if taken >= BATCH:
                continue
            if select.select([sock], [], [], POLL)[0]:
                try:
                    kind, arg = read_frame(reader)
                except EOFError:
                    return  # the node is gone: its restart starts another recorder
                if kind == "flush":
                    flushes.append(arg)
                elif kind == "stop":
                    stopping = True
    finally:
        feed.close()


if __name__ == "__main__":
    # Ctrl-C, and SIGTERM from systemd's control-group stop or `kill -- -PGID`, reach the whole
    # process group: the node drains, then tells us when to end (stop, or the socket closes).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.nice(NICE)
    logging.getLogger().setLevel(logging.INFO)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        _serve(int(sys.argv[1]))
