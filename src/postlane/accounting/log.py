"""Accounting file writer: CSV (RFC 4180) and/or JSON Lines, rotated by age and size.

The recorder (``audit.recorder``) writes the files from the spool's events. Writes go to
large user-space buffers; ``sync`` is the durability point: it fsyncs the files and then
replaces a small *position file* beside them with the files' sizes and the last event each
spool writer has in them. After a crash, ``recover`` cuts the files back to those sizes and
returns the event numbers, and the recorder writes the events after them again: every event is
in the files exactly once, whatever moment the process died at. Rotation happens only at a
sync, so the position file always names the files being written.

A write that fails (ENOSPC, EIO) goes back to the last sync: what was buffered since is
dropped, the files are cut back to the sizes the position names, and the error is raised; the
caller writes again from ``feed`` later. A failed write can leave part of a batch (or of a
line) in a file, and buffering on past it would put those records in twice once space returns.
The undo covers the event list too: after it, ``runs`` and ``records`` describe the
synced files again.

A file *shorter* than its position says lost synced lines (a power loss on a disk that lied
about its fsync, a file cut outside Postlane): the position also lists which spool events the
current files' lines are (``runs``), so ``recover`` cuts every file back to its last whole
record, says so, and hands back the events of the lines lost (``lost``) for the recorder to
write again (from the spool, or from the audit store once the spool has let them go).

In a cluster the position is also committed to the database (``commit``), between the fsync
and the position file, in the transaction that tells the cluster how far the files got
(``writers.filed``, where a node adopting a dead node's events goes on from). Each position
carries a generation (``gen``); a reader of the files (the node's own restart, ``audit verify
--files``, ``postlane killtest``) trusts the newer of the file's and the database's
(``read_position(published=...)``). A node killed for good between its fsync and that commit
leaves lines past both positions: no reader counts them, and the adopter writes them into its
own files; killed between the commit and the position file, the database's position names them
and the adopter starts after them. Each record is in one node's files, either way.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from postlane.accounting.records import DEFAULT_FIELDS, Record
from postlane.config.fields import resolve_fields

__all__ = ["FORMATS", "AccountingLog", "resolve_fields"]

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("csv", "jsonl")
_FILE_MODE = 0o640
_DIR_MODE = 0o750
_BUFFER_BYTES = 256 * 1024
CLOSED_KEPT = 64
"""Rotated files the position remembers the size of (a check at open, not a full proof:
``postlane audit verify --files`` compares every line of every file with the store)."""
POSITION_FILE = ".position.json"
_FLOATS = frozenset({"totalSecondsQueued"})  # written with 3 decimals in CSV



def read_position(directory: Path, prefix: str = "acct",
                  published: Mapping | None = None) -> dict:
    """The position of a node's accounting files in ``directory`` (their names and committed
    sizes, ``feed``, ``lost``): its position file's, or ``published`` (the one a cluster's
    database holds for the node, ``spool.outbox.cluster_position``) if that is newer; {} if
    there is neither or it cannot be read. The files' lines past these sizes are no record of
    theirs (a node killed for good left them; another node wrote those records)."""
    try:
        saved = json.loads((directory / f"{prefix}{POSITION_FILE}").read_bytes())
        _check_shape(saved)
    except (OSError, ValueError, TypeError, AttributeError):
        saved = {}
    return _newer(saved, published)


def _newer(saved: dict, published: Mapping | None) -> dict:
    """The newer (by ``gen``) of a position file's ``saved`` and the cluster's ``published``."""
    if not published:
        return saved
    try:
        _check_shape(published)
        if int(published.get("gen", 0)) > int(saved.get("gen", 0)):
            return dict(published)
    except (ValueError, TypeError, AttributeError):
        log.error("the cluster's accounting position is unreadable; the position file is used")
    return saved


def _check_shape(saved: Any) -> None:
    """Raise ValueError or TypeError unless ``saved`` has the shape ``_save_position`` writes
    (valid JSON edited or cut by hand must not stop the node: it is an unreadable position)."""
    def whole(*values: Any) -> None:
        if not all(isinstance(v, int) for v in values):
            raise TypeError(f"not whole numbers: {values!r}")

    if not isinstance(saved, dict):
        raise TypeError("not a JSON object")
    for name, size in saved.get("files", {}).values():
        os.fspath(name)
        whole(size)
    whole(*saved.get("feed", {}).values(), saved.get("records", 0),
          *saved.get("first", {}).values())
    for first, last in saved.get("lost", {}).values():
        whole(first, last)
    whole(*saved.get("closed", {}).values())
    for _, first, last in saved.get("runs", []):
        whole(first, last)
    whole(saved.get("gen", 0))


class AccountingLog:
    """Append-only accounting files; one file per format, all rotated together.

    Thread-safe. ``clock`` exists so tests can drive age-based rotation without sleeping.
    """

    def __init__(
        self,
        directory: Path,
        *,
        formats: Sequence[str] = ("csv",),
        fields: Sequence[str] = DEFAULT_FIELDS,
        rotate_seconds: float = 86400,
        rotate_bytes: int = 100 * 1024 * 1024,
        prefix: str = "acct",
        clock: Callable[[], float] = time.time,
        commit: Callable[[dict], None] | None = None,
        published: Mapping | None = None,
    ) -> None:
        """``commit`` (a cluster's recorder): called with each position ``sync`` makes, after
        the fsync and before the position file; what it raises fails the sync (the files go
        back to the last one). ``published``: the position it committed last (the newer of it
        and the position file is the one recovered)."""
        if not formats:
            raise ValueError("at least one accounting format is required")
        for fmt in formats:
            if fmt not in FORMATS:
                raise ValueError(f"unknown accounting format {fmt!r} (expected one of {FORMATS})")
        if len(set(formats)) != len(formats):
            raise ValueError(f"duplicate accounting format in {list(formats)!r}")
        if rotate_seconds <= 0 or rotate_bytes <= 0:
            raise ValueError("rotate_seconds and rotate_bytes must be positive")
        if not prefix or "/" in prefix or os.sep in prefix:
            raise ValueError(f"invalid accounting file prefix {prefix!r}")
        self._columns = resolve_fields(fields)
        self._header = [name for name, _ in self._columns]
        self._all_default = tuple(self._header) == DEFAULT_FIELDS
        self._float_columns = [i for i, (_, key) in enumerate(self._columns) if key in _FLOATS]
        # orjson writes the bytes of json.dumps(ensure_ascii=False, separators=(",", ":")) for
        # these values, ≈ 10x faster; JSONL lines were ≈ 2 % of the event loop (py-spy, 200k bench)
        self._json = orjson.dumps
        self.directory = Path(directory)
        self.formats: tuple[str, ...] = tuple(formats)
        self.fields: tuple[str, ...] = tuple(self._header)
        self.rotate_seconds = float(rotate_seconds)
        self.rotate_bytes = int(rotate_bytes)
        self.prefix = prefix
        self._clock = clock
        self._commit = commit
        self._published = published
        self._gen = 0
        """The last position's generation (each save makes the next one)."""
        self._lock = threading.Lock()
        self._files: dict[str, int] = {}
        """File descriptors, one per format (our own buffers: a failed write must be undone)."""
        self._pending: dict[str, bytearray] = {}
        self._sizes: dict[str, int] = {}
        """Each file's size once its pending bytes are written."""
        self._synced: dict[str, int] = {}
        """Each file's size as of the last sync: what the position file names."""
        self._opened_at = 0.0
        self._closed = False
        self.feed: dict[str, int] = {}
        """Each spool writer's last event the files hold, as of the last ``sync``."""
        self.first: dict[str, int] = {}
        """Each spool writer's first event the files hold: 1, but for a writer adopted from a
        cluster node that died, the first after those its own files had (``audit verify
        --files`` looks for its events from there on)."""
        self._runs: list[list] = []
        """``[writer, first, last]``: the spool events the current files' lines are, in order
        (one line per event in each file; lines written by ``write``/``write_many`` have none,
        and then ``_records`` exceeds what the runs count)."""
        self._records = 0
        """Records in the current files."""
        self._synced_runs: list[list] = []
        self._synced_records = 0
        """``_runs`` and ``_records`` as of the last sync: what the position file names."""
        self.lost: dict[str, tuple[int, int]] = {}
        """Per spool writer, the first and last event whose lines a file shorter than its
        position lost: kept in the position until the recorder has written them again (and
        taken them out of here); a failed write puts back what the last sync had."""
        self._synced_lost: dict[str, tuple[int, int]] = {}
        self.closed: dict[str, int] = {}
        """The last ``CLOSED_KEPT`` rotated files and their sizes when closed (fsynced): one
        that has changed since is named at open (``changed``)."""
        self.changed: list[str] = []
        """What open found of the closed files: each one whose size differs, and how."""
        # csv writes into a reusable in-memory buffer so the exact encoded size is known.
        self._csv_buf = io.StringIO()
        self._csv = csv.writer(self._csv_buf, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
        self.current_paths: dict[str, Path] = {}
        self.directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        self.recovered_bytes = self._recover()
        """Bytes cut off the files at open: lines written after the last sync (written again
        by the recorder)."""
        self.open_error: OSError | None = None
        """Why the files could not be set up at open (the disk full): none are open yet, and
        the next write or sync tries again (the records wait in the spool meanwhile)."""
        try:
            self._open_files()
        except OSError as exc:
            self.open_error = exc

    # -- public API -------------------------------------------------------------------------

    def write(self, record: Record) -> None:
        """Buffer one record."""
        self.write_many((record,))

    def write_many(self, records: Iterable[Record]) -> None:
        """Buffer several records under one lock acquisition. An OSError (the disk full)
        takes the files back to the last sync (``feed``) before it is raised."""
        with self._lock:
            self._check_open()
            self._ensure_files()
            with self._undo_on_error():
                for record in records:
                    self._write_locked(record)

    def write_events(self, writer: str, events: Sequence[tuple[int, Record]]) -> None:
        """Buffer the records of spool events ``(n, record)`` of ``writer``, in order; the
        position names them, so lines a crash tears away can be written again. An OSError
        takes the files (and their event list) back to the last sync, as ``write_many``."""
        with self._lock:
            self._check_open()
            self._ensure_files()
            with self._undo_on_error():
                if events and events[0][0] < self.first.get(writer, events[0][0] + 1):
                    self.first[writer] = events[0][0]
                for n, record in events:
                    self._write_locked(record)
                    runs = self._runs
                    if runs and runs[-1][0] == writer and runs[-1][2] == n - 1:
                        runs[-1][2] = n
                    else:
                        runs.append([writer, n, n])

    def sync(self, feed: Mapping[str, int] | None = None) -> None:
        """Make everything written so far durable and record ``feed`` (each spool writer's last
        event now in the files) in the position file; rotate if the files are due. An OSError
        takes the files back to the previous sync before it is raised (``feed`` unchanged)."""
        with self._lock:
            self._check_open()
            self._leave_gone_files()
            self._ensure_files()
            with self._undo_on_error():
                self._write_out(fsync=True)
                new_feed = {**self.feed, **(feed or {})}
                data = self._position_data(self._sizes, new_feed)
                if self._commit is not None:
                    try:
                        self._commit(data)
                    except OSError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - the database's error
                        raise OSError(errno.EIO, f"accounting position not committed to the"
                                      f" cluster ({type(exc).__name__}: {exc})") from exc
                    self._gen = data["gen"]  # committed: never reused, whatever follows
                self._save_position(self._sizes, new_feed, data)
                self.feed = new_feed
                if self._clock() - self._opened_at >= self.rotate_seconds or any(
                        size >= self.rotate_bytes for size in self._sizes.values()):
                    self._rotate_locked()

    def flush(self, fsync: bool = False) -> None:
        """Push buffers to the OS; with fsync, to stable storage (``sync`` also moves the
        position)."""
        with self._lock:
            self._check_open()
            with self._undo_on_error():
                self._write_out(fsync)

    def rotate(self) -> None:
        """Close (with fsync) the current files and start new ones."""
        with self._lock:
            self._check_open()
            self._ensure_files()
            with self._undo_on_error():
                self._write_out(fsync=True)
                self._save_position(self._sizes, self.feed)
                self._rotate_locked()

    def close(self) -> None:
        """Flush, fsync, record the position and close; idempotent. (The recorder passes its
        last ``feed`` through ``sync`` first.) Lines that cannot be written (the disk full)
        are dropped back to the last sync: the recorder writes them at its next start."""
        with self._lock:
            if self._closed:
                return
            if not self._files:  # never set up (the disk full): the position is as it was
                self._closed = True
                return
            try:
                with self._undo_on_error():
                    self._write_out(fsync=True)
                    self._save_position(self._sizes, self.feed)
            except OSError as exc:
                log.error("accounting files closed at their last sync (%s); the records after"
                          " it are written at the next start", exc)
            self._closed = True
            for fd in self._files.values():
                os.close(fd)
            self._files = {}

    def __enter__(self) -> AccountingLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("accounting log is closed")

    def _open_files(self) -> None:
        """New files and the position naming them (nothing left behind if that fails)."""
        self._install(*self._create_files())
        try:
            self._save_position(self._sizes, self.feed)
        except OSError:
            self._discard(self._files, self.current_paths)
            self._files, self.current_paths = {}, {}
            raise

    def _ensure_files(self) -> None:
        """Set the files up if the open could not (raises OSError while it still cannot)."""
        if not self._files:
            self._open_files()
            self.open_error = None

    def _leave_gone_files(self) -> None:
        """Files no longer in the folder (removed, or moved away with it, while the node runs)
        are left at their last sync, as a restart leaves a file moved away, and the error is
        raised: the caller writes the records after that sync again, into new files once the
        folder is there (written on into the open files, they went where nobody looks)."""
        for fmt, fd in self._files.items():
            path = self.current_paths[fmt]
            try:
                here, there = os.stat(path), os.fstat(fd)
            except FileNotFoundError:
                break
            if (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
                break
        else:
            return
        log.error("accounting file %s is gone from %s (removed or moved while the node runs):"
                  " the records after its last sync go to new files there", path,
                  self.directory)
        self._rewind()
        for fmt, fd in self._files.items():
            self._close_as(str(self.current_paths[fmt]), self._synced[fmt])
            os.close(fd)
        self._files = {}
        raise FileNotFoundError(errno.ENOENT, "accounting file gone from its folder (removed"
                                " or moved): new files are started", str(path))

    def _write_locked(self, record: Record) -> None:
        self._check_open()
        if not self._files:  # a caller that skipped ``_ensure_files`` would drop the line
            raise RuntimeError("accounting files are not set up")
        values = record.as_dict()
        if self._all_default:
            row = list(values.values())
        else:
            row = [values[key] if key is not None else "" for _, key in self._columns]
        for fmt, fd in self._files.items():
            if fmt == "csv":
                cells = row.copy()
                for i in self._float_columns:
                    cells[i] = f"{cells[i]:.3f}"
                data = self._csv_line(cells)
            else:
                obj = values if self._all_default else dict(zip(self._header, row, strict=True))
                data = self._json(obj)
                if b"\xe2\x80" in data or b"\xc2\x85" in data:
                    data = _escape_separators(data)
                data += b"\n"
            pending = self._pending[fmt]
            pending += data
            self._sizes[fmt] += len(data)
            if len(pending) >= _BUFFER_BYTES:
                _write_all(fd, pending)
        self._records += 1

    def _csv_line(self, row: Sequence[object]) -> bytes:
        buf = self._csv_buf
        buf.seek(0)
        buf.truncate()
        self._csv.writerow(row)
        return buf.getvalue().encode()

    @contextlib.contextmanager
    def _undo_on_error(self) -> Iterator[None]:
        try:
            yield
        except OSError:
            self._rewind()
            raise

    def _write_out(self, fsync: bool) -> None:
        for fmt, fd in self._files.items():
            _write_all(fd, self._pending[fmt])
            if fsync:
                os.fsync(fd)

    def _rewind(self) -> None:
        """Back to the last sync: drop the pending bytes, cut the files to the sizes the
        position names (a cut frees space, so it works on a full disk)."""
        for fmt, fd in self._files.items():
            self._pending[fmt].clear()
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._synced[fmt])
        self._sizes = dict(self._synced)
        # the event list too: the retry writes the same events again, and a list still
        # naming the dropped ones would misname the lines a later torn tail loses
        self._runs = [list(run) for run in self._synced_runs]
        self._records = self._synced_records
        # and the lost events: the recorder took out those it wrote again, and they are not
        self.lost = dict(self._synced_lost)

    def _rotate_locked(self) -> None:
        """New files first, then the position naming them, then the old files closed: a crash
        at any step leaves a position that names files holding exactly what it says. The
        current files are synced and named by the position already. New files that cannot be
        set up (the disk full) are removed and the current ones stay."""
        old, old_paths, old_opened = self._files, self.current_paths, self._opened_at
        old_runs, old_records, old_closed = self._runs, self._records, dict(self.closed)
        new = self._create_files()
        for fmt in old:
            self._close_as(str(old_paths[fmt]), self._synced[fmt])
        self._install(*new)
        try:
            self._save_position(self._sizes, self.feed)
        except OSError:
            self.closed = old_closed
            self._discard(self._files, self.current_paths)
            self._files, self.current_paths, self._opened_at = old, old_paths, old_opened
            self._pending = {fmt: bytearray() for fmt in old}
            self._sizes = {fmt: os.fstat(fd).st_size for fmt, fd in old.items()}
            self._synced = dict(self._sizes)
            self._runs, self._records = old_runs, old_records
            self._synced_runs = [list(run) for run in old_runs]
            self._synced_records = old_records
            raise
        for fd in old.values():
            os.close(fd)

    # -- the position file ----------------------------------------------------------------------

    def _position_path(self) -> Path:
        return self.directory / f"{self.prefix}{POSITION_FILE}"

    def _position_data(self, sizes: Mapping[str, int], feed: Mapping[str, int]) -> dict:
        """The next position (generation ``_gen`` + 1) naming ``sizes`` and ``feed``."""
        return json.loads(json.dumps({
            "files": {fmt: [str(p), sizes[fmt]] for fmt, p in self.current_paths.items()},
            "feed": dict(feed), "first": self.first, "records": self._records,
            "runs": self._runs,
            "lost": self.lost, "closed": self.closed, "gen": self._gen + 1}))

    def _save_position(self, sizes: Mapping[str, int], feed: Mapping[str, int],
                       position: dict | None = None) -> None:
        """Replace the position file (written and fsynced aside, then renamed); once renamed,
        ``sizes`` are what a restart cuts the files back to."""
        if position is None:
            position = self._position_data(sizes, feed)
        data = json.dumps(position).encode()
        path = self._position_path()
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
        try:
            _write_all(fd, bytearray(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._gen = int(position["gen"])
        self._synced = dict(sizes)
        self._synced_runs = [list(run) for run in self._runs]
        self._synced_records = self._records
        self._synced_lost = dict(self.lost)
        with contextlib.suppress(OSError):  # the rename is done: a lost one is the old position
            self._fsync_directory()

    def _recover(self) -> int:
        """Cut the files the position names back to their recorded sizes; returns how many
        bytes that removed. No position file: a new directory (or one written before positions
        existed), nothing to cut."""
        path = self._position_path()
        try:
            saved = json.loads(path.read_bytes())
            _check_shape(saved)
        except FileNotFoundError:
            saved = {}
        except (ValueError, TypeError, AttributeError) as exc:
            log.error("accounting position file %s is unreadable (%s); records after the last"
                      " sync may appear twice in the files", path, exc)
            saved = {}
        chosen = _newer(saved, self._published)
        if chosen is not saved:
            log.warning("accounting files: the cluster's position of them (generation %d) is"
                        " newer than %s (%d): the node died between the two; it is used",
                        chosen["gen"], path, saved.get("gen", 0))
            saved = chosen
        if not saved:
            return 0
        self._gen = int(saved.get("gen", 0))
        self.feed = {str(w): int(n) for w, n in saved.get("feed", {}).items()}
        self.first = {str(w): int(n) for w, n in saved.get("first", {}).items()}
        self.lost = {str(w): (int(a), int(b)) for w, (a, b) in saved.get("lost", {}).items()}
        self._check_closed(saved.get("closed", {}))
        self._repair_torn(saved)
        cut = 0
        for name, size in saved.get("files", {}).values():
            try:
                extra = os.path.getsize(name) - size
            except FileNotFoundError:
                continue  # moved away (a log shipper's rotation): nothing to cut
            if extra > 0:
                fd = os.open(name, os.O_WRONLY)
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                cut += extra
            # the files of the last run are closed now: this run writes new ones
            self._close_as(name, os.path.getsize(name))
        if cut:
            log.warning("accounting files cut back by %d bytes to their last sync; the"
                        " recorder writes those records again", cut)
        return cut

    def _close_as(self, name: str, size: int) -> None:
        """Remember a file closed at ``size`` (the last ``CLOSED_KEPT`` of them)."""
        self.closed.pop(name, None)
        self.closed[name] = size
        while len(self.closed) > CLOSED_KEPT:
            del self.closed[next(iter(self.closed))]

    def _check_closed(self, closed: Mapping[str, int]) -> None:
        """Rotated files are never written again: one whose size changed since it was closed
        was cut or edited outside Postlane (a file moved or compressed away is not checked)."""
        for name, size in closed.items():
            try:
                now = os.path.getsize(name)
            except FileNotFoundError:
                continue
            self.closed[name] = int(size)
            if now != size:
                self.changed.append(f"{name} is {now} bytes, {size} when it was closed")
                log.error("accounting file %s is %d bytes, %d when it was closed: it was changed"
                          " outside Postlane; postlane audit verify --files names the records"
                          " it lacks or adds", name, now, size)

    def _repair_torn(self, saved: dict) -> None:
        """Files shorter than the position says (their synced tail is gone): cut every file
        the position names back to the same last whole record and note the events of the
        lines lost in ``lost`` (and take them out of ``feed``), to be written again."""
        files = {fmt: (Path(name), int(size)) for fmt, (name, size) in
                 saved.get("files", {}).items() if os.path.exists(name)}
        short = {fmt: size - os.path.getsize(path) for fmt, (path, size) in files.items()
                 if os.path.getsize(path) < size}
        if not short:
            return
        ends = {fmt: _record_ends(path.read_bytes()[:size], fmt == "csv")
                for fmt, (path, size) in files.items()}
        head = {fmt: int(fmt == "csv") for fmt in files}  # a CSV file starts with its header
        keep = max(0, min(len(e) - head[fmt] for fmt, e in ends.items()))
        for fmt, (path, _) in files.items():
            whole = keep + head[fmt]  # lines to keep
            cut_at = ends[fmt][whole - 1] if whole and len(ends[fmt]) >= whole else 0
            with open(path, "r+b") as fh:
                fh.truncate(cut_at)
                os.fsync(fh.fileno())
        where = ", ".join(f"{files[fmt][0].name} ({n} bytes)" for fmt, n in short.items())
        if "records" not in saved:  # a position file from before the event lists
            log.error("accounting files shorter than at their last sync (a power loss, or cut"
                      " outside Postlane): %s; cut back to their last whole record, the records"
                      " after it cannot be named (no event list in the position file): see the"
                      " audit store", where)
            return
        records, runs = int(saved["records"]), saved.get("runs", [])
        lost_count = records - keep
        counted = sum(last - first + 1 for _, first, last in runs)
        skip = keep - (records - counted)  # runs describe the last ``counted`` records
        for writer, first, last in runs:
            if skip > last - first:
                skip -= last - first + 1
                continue
            first, skip = first + max(skip, 0), 0
            was = self.lost.get(writer)
            self.lost[writer] = (min(first, was[0]) if was else first, max(last, was[1]) if was
                                 else last)
            self.feed[writer] = min(self.feed.get(writer, first), first - 1)
        log.error("accounting files shorter than at their last sync (a power loss, or cut"
                  " outside Postlane): %s; cut back to their last whole record, %d record(s)"
                  " after it %s", where, lost_count,
                  "to be written again" if self.lost else "cannot be named (no event list in"
                  " the position file): see the audit store")

    def _create_files(self) -> tuple[dict[str, int], dict[str, Path]]:
        """New files (one per format, the CSV one with its header written); none left behind
        if that fails."""
        now = self._clock()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
        n = 0
        while True:
            base = f"{self.prefix}-{stamp}" + (f"-{n}" if n else "")
            paths = {fmt: self.directory / f"{base}.{fmt}" for fmt in self.formats}
            if not any(p.exists() for p in paths.values()):
                files = self._create_exclusive(paths)
                if files is not None:
                    break
            n += 1
        try:
            if "csv" in files:  # tailers and parsers never see a headerless file
                _write_all(files["csv"], bytearray(self._csv_line(self._header)))
            self._fsync_directory()
        except OSError:
            self._discard(files, paths)
            raise
        self._opened_at = now
        return files, paths

    def _install(self, files: dict[str, int], paths: dict[str, Path]) -> None:
        self._files = files
        self.current_paths = paths
        self._pending = {fmt: bytearray() for fmt in files}
        self._sizes = {fmt: os.fstat(fd).st_size for fmt, fd in files.items()}
        self._runs, self._records = [], 0

    @staticmethod
    def _discard(files: dict[str, int], paths: dict[str, Path]) -> None:
        for fmt, fd in files.items():
            os.close(fd)
            paths[fmt].unlink(missing_ok=True)

    def _create_exclusive(self, paths: dict[str, Path]) -> dict[str, int] | None:
        """Create all files or none (None if another writer raced us to a name)."""
        files: dict[str, int] = {}
        try:
            for fmt, path in paths.items():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, _FILE_MODE)
                files[fmt] = fd
                os.fchmod(fd, _FILE_MODE)  # exactly 0640 whatever the umask
        except FileExistsError:
            self._discard(files, paths)
            return None
        except OSError:
            self._discard(files, paths)
            raise
        return files

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _record_ends(data: bytes, quoted: bool) -> list[int]:
    """The offset after each whole record (line) in ``data``; with ``quoted`` (CSV), a line
    break inside a quoted field does not end a record."""
    ends, pos, open_quote = [], 0, False
    for line in data.split(b"\n")[:-1]:  # the last piece has no line break: torn
        pos += len(line) + 1
        open_quote ^= line.count(b'"') % 2 == 1
        if not (quoted and open_quote):
            ends.append(pos)
    return ends


_SEPARATORS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"),
               (b"\xc2\x85", b"\\u0085"))


def _escape_separators(data: bytes) -> bytes:
    """U+2028, U+2029 and NEL as JSON escapes (orjson writes them raw, as JSON allows): one
    record stays one line for readers that break lines where ``str.splitlines`` does. In
    orjson's UTF-8 these bytes only ever occur as those characters, inside strings."""
    for raw, escaped in _SEPARATORS:
        data = data.replace(raw, escaped)
    return data


def _write_all(fd: int, data: bytearray) -> None:
    """Write ``data`` and empty it; on an error, what was written is gone from it too (the
    caller rewinds the file anyway)."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    finally:
        written = len(data) - len(view)
        view.release()
        del data[:written]
