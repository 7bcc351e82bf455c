"""Accounting file writer: CSV (RFC 4180) and/or JSON Lines, rotated by age and size.

The recorder (``audit.recorder``) writes the files from the spool's events. Writes go to
large user-space buffers; ``sync`` is the durability point: it fsyncs the files and then
replaces a small *position file* beside them with the files' sizes and the last event each
spool writer has in them. After a crash, ``recover`` cuts the files back to those sizes and
returns the event numbers, and the recorder writes the events after them again: every event is
in the files exactly once, whatever moment the process died at. Rotation happens only at a
sync, so the position file always names the files being written.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import orjson

from postlane.accounting.records import DEFAULT_FIELDS, Record
from postlane.config.fields import resolve_fields

__all__ = ["FORMATS", "AccountingLog", "resolve_fields"]

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("csv", "jsonl")
_FILE_MODE = 0o640
_DIR_MODE = 0o750
_BUFFER_BYTES = 256 * 1024
POSITION_FILE = ".position.json"
_FLOATS = frozenset({"totalSecondsQueued"})  # written with 3 decimals in CSV


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
    ) -> None:
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
        self._lock = threading.Lock()
        self._files: dict[str, BinaryIO] = {}
        self._sizes: dict[str, int] = {}
        self._opened_at = 0.0
        self._closed = False
        self.feed: dict[str, int] = {}
        """Each spool writer's last event the files hold, as of the last ``sync``."""
        # csv writes into a reusable in-memory buffer so the exact encoded size is known.
        self._csv_buf = io.StringIO()
        self._csv = csv.writer(self._csv_buf, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
        self.current_paths: dict[str, Path] = {}
        self.directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        self.recovered_bytes = self._recover()
        """Bytes cut off the files at open: lines written after the last sync (written again
        by the recorder)."""
        self._open_files()
        self._save_position()

    # -- public API -------------------------------------------------------------------------

    def write(self, record: Record) -> None:
        """Buffer one record."""
        with self._lock:
            self._write_locked(record)

    def write_many(self, records: Iterable[Record]) -> None:
        """Buffer several records under one lock acquisition."""
        with self._lock:
            for record in records:
                self._write_locked(record)

    def sync(self, feed: Mapping[str, int] | None = None) -> None:
        """Make everything written so far durable and record ``feed`` (each spool writer's last
        event now in the files) in the position file; rotate if the files are due."""
        with self._lock:
            self._check_open()
            for fh in self._files.values():
                fh.flush()
                os.fsync(fh.fileno())
            if feed:
                self.feed.update(feed)
            if self._clock() - self._opened_at >= self.rotate_seconds or any(
                    size >= self.rotate_bytes for size in self._sizes.values()):
                self._rotate_locked()
            else:
                self._save_position()

    def flush(self, fsync: bool = False) -> None:
        """Push buffers to the OS; with fsync, to stable storage (``sync`` also moves the
        position)."""
        with self._lock:
            self._check_open()
            for fh in self._files.values():
                fh.flush()
                if fsync:
                    os.fsync(fh.fileno())

    def rotate(self) -> None:
        """Close (with fsync) the current files and start new ones."""
        with self._lock:
            self._check_open()
            self._rotate_locked()

    def close(self) -> None:
        """Flush, fsync, record the position and close; idempotent. (The recorder passes its
        last ``feed`` through ``sync`` first.)"""
        with self._lock:
            if self._closed:
                return
            for fh in self._files.values():
                fh.flush()
                os.fsync(fh.fileno())
            self._save_position()
            self._closed = True
            _retire(self._files)
            self._files = {}

    def __enter__(self) -> AccountingLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("accounting log is closed")

    def _write_locked(self, record: Record) -> None:
        self._check_open()
        values = record.as_dict()
        if self._all_default:
            row = list(values.values())
        else:
            row = [values[key] if key is not None else "" for _, key in self._columns]
        for fmt, fh in self._files.items():
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
            fh.write(data)
            self._sizes[fmt] += len(data)

    def _csv_line(self, row: Sequence[object]) -> bytes:
        buf = self._csv_buf
        buf.seek(0)
        buf.truncate()
        self._csv.writerow(row)
        return buf.getvalue().encode()

    def _rotate_locked(self) -> None:
        """New files first, then the position naming them, then the old files closed: a crash
        at any step leaves a position that names files holding exactly what it says."""
        old = self._files
        for fh in old.values():
            fh.flush()
            os.fsync(fh.fileno())
        self._open_files()
        self._save_position()
        _retire(old)

    # -- the position file ----------------------------------------------------------------------

    def _position_path(self) -> Path:
        return self.directory / f"{self.prefix}{POSITION_FILE}"

    def _save_position(self) -> None:
        data = json.dumps({"files": {fmt: [str(p), self._sizes[fmt]]
                                     for fmt, p in self.current_paths.items()},
                           "feed": self.feed}).encode()
        path = self._position_path()
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _FILE_MODE)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._fsync_directory()

    def _recover(self) -> int:
        """Cut the files the position names back to their recorded sizes; returns how many
        bytes that removed. No position file: a new directory (or one written before positions
        existed), nothing to cut."""
        path = self._position_path()
        try:
            saved = json.loads(path.read_bytes())
        except FileNotFoundError:
            return 0
        except ValueError:
            log.error("accounting position file %s is unreadable; records after the last"
                      " sync may appear twice in the files", path)
            return 0
        self.feed = {str(w): int(n) for w, n in saved.get("feed", {}).items()}
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
        if cut:
            log.warning("accounting files cut back by %d bytes to their last sync; the"
                        " recorder writes those records again", cut)
        return cut

    def _open_files(self) -> None:
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
        self._files = files
        self.current_paths = paths
        self._sizes = dict.fromkeys(self.formats, 0)
        self._opened_at = now
        if "csv" in files:
            header = self._csv_line(self._header)
            files["csv"].write(header)
            files["csv"].flush()  # tailers and parsers never see a headerless file
            self._sizes["csv"] = len(header)
        self._fsync_directory()

    def _create_exclusive(self, paths: dict[str, Path]) -> dict[str, BinaryIO] | None:
        """Create all files or none (None if another writer raced us to a name)."""
        files: dict[str, BinaryIO] = {}
        try:
            for fmt, path in paths.items():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, _FILE_MODE)
                os.fchmod(fd, _FILE_MODE)  # exactly 0640 whatever the umask
                files[fmt] = open(fd, "wb", buffering=_BUFFER_BYTES)  # noqa: SIM115
        except FileExistsError:
            for fmt, fh in files.items():
                fh.close()
                paths[fmt].unlink(missing_ok=True)
            return None
        return files

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_SEPARATORS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"),
               (b"\xc2\x85", b"\\u0085"))


def _escape_separators(data: bytes) -> bytes:
    """U+2028, U+2029 and NEL as JSON escapes (orjson writes them raw, as JSON allows): one
    record stays one line for readers that break lines where ``str.splitlines`` does. In
    orjson's UTF-8 these bytes only ever occur as those characters, inside strings."""
    for raw, escaped in _SEPARATORS:
        data = data.replace(raw, escaped)
    return data


def _retire(files: dict[str, BinaryIO]) -> None:
    """Flush, fsync and close files that no record goes to any more."""
    for fh in files.values():
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
