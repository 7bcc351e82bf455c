"""The accounting files against the audit store (``postlane audit verify --files``).

Every record goes two ways: into the store and into the accounting files. This proves they say
the same thing, rotated files included. A file line and a stored record are the same event when
they have the same **key**: record type, ``timeLogged`` (as the files write it: UTC to the
millisecond), ``queueId`` and ``rcpt``. Both carry those four for every record type (the spool
event number, which would be exact, is not in the files), and no two records of one node share
them except records that are wholly alike (those are counted: the files must hold a key as often
as the store does). A record retention pseudonymised or deleted keeps its type, time and queue id
but not the address: it is matched on those three alone.

Memory: the files are streamed twice at most (the second time only to name what differs), the
store once through its time index. What is kept is a dict of one 128-bit key per distinct file
line (measured: ≈ 86 bytes a line, 86 MB for a million lines), never the rows themselves.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ..accounting.log import FORMATS, read_position
from ..accounting.records import RECORD_TYPES, format_time, parse_time
from ..config.fields import resolve_fields
from .chain import INTACT
from .store import AuditStore, Query

__all__ = ["KEY_FIELDS", "FilesCheck", "check_files", "ordered"]

KEY_FIELDS: tuple[str, ...] = ("type", "timeLogged", "queueId", "rcpt")
"""The file fields a line is matched on (see the module's docstring)."""
LIMIT = 50
"""Problems named per kind (the first ones); the rest are counted."""
_MAX_SPAN = 64
"""Physical lines one CSV record may span (a quoted remote reply with line breaks)."""
_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\+0000")
_M64 = (1 << 64) - 1
_NAME = re.compile(r"acct-(\d{8}-\d{6})(?:-(\d+))?\.\w+(?:\.gz)?")


def _key(rtype: str, when: str, queue_id: str, rcpt: str | None) -> int:
    """128 bits: the type, time and queue id in the high half (what a pseudonymised or purged
    record still has), the recipient in the low half. Python's hash is salted per process, and
    both sides are hashed in this one."""
    return ((hash((rtype, when, queue_id)) & _M64) << 64) | (hash(rcpt) & _M64)


@dataclass
class FilesCheck:
    """What ``check_files`` found; each list holds the first ``LIMIT`` of its kind."""

    checked: bool = True
    reason: str = ""
    """Why the files were not checked (``checked`` False)."""
    lines: int = 0
    files: int = 0
    format: str = ""
    span: tuple[str, str] | None = None
    missing: list[str] = field(default_factory=list)
    not_in_store: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("missing", "not_in_store", "doubled", "cut"), 0))

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())

    def add(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        items = getattr(self, kind)
        if len(items) < LIMIT:
            items.append(text)

    def as_dict(self) -> dict:
        return {"checked": self.checked, "reason": self.reason or None, "ok": self.ok,
                "format": self.format or None, "files": self.files, "lines": self.lines,
                "span": list(self.span) if self.span else None, "counts": self.counts,
                "missing": self.missing, "not_in_store": self.not_in_store,
                "doubled": self.doubled, "cut": self.cut}

    def report(self) -> list[str]:
        """One line per problem (the first ``LIMIT`` of each kind, then a count), or one line
        saying all match or why nothing was checked."""
        if not self.checked:
            return [f"files: not checked: {self.reason}"]
        if self.ok:
            return [f"files: {self.lines} lines in {self.files} files match the store"]
        out: list[str] = []
        for kind, label in (("missing", "missing from the files"),
                            ("not_in_store", "not in the store"), ("doubled", "doubled"),
                            ("cut", "not a whole record")):
            out.extend(f"FILES: {label}: {item}" for item in getattr(self, kind))
            more = self.counts[kind] - len(getattr(self, kind))
            if more > 0:
                out.append(f"FILES: … and {more} more {label}")
        return out


@dataclass
class _Line:
    path: Path
    number: int
    rtype: str
    when: str
    queue_id: str
    rcpt: str

    def __str__(self) -> str:
        return f"{self.rtype} {self.queue_id} to {self.rcpt or '-'} at {self.when}"


def ordered(paths: Iterable[Path]) -> list[Path]:
    """Accounting files oldest first: by the time in the name, then the number a file made in
    the same second gets (``acct-20261206-162552-1.csv`` after ``acct-20261206-162552.csv``)."""
    def order(path: Path) -> tuple[str, int]:
        found = _NAME.fullmatch(path.name)
        return (found[1], int(found[2] or 0)) if found else (path.name, 0)

    return sorted(paths, key=order)


def check_files(store: AuditStore, directory: Path, formats: list[str],
                fields: list[str], published: dict | None = None) -> FilesCheck:
    """Compare the accounting files in ``directory`` (CSV if the node writes it, else JSONL)
    with ``store``: records in the files' time span that no line has, lines the store has no
    record of (older than its oldest record: not judged), lines present twice, lines that are
    not a whole record. Records of spool events the files have not reached yet (past the
    position file's ``feed``, or lost lines being written again) are not missing, nor are those
    of an adopted writer before the position's ``first`` (in the dead node's files). The files
    the position names are read up to its sizes: what a node killed for good wrote past them is
    not its record (``published``: the position a cluster's database holds for the node, used
    when it is newer than the file's; see ``AccountingLog``)."""
    result = FilesCheck()
    names = {name for name, _ in resolve_fields(fields)}
    lacking = [f for f in KEY_FIELDS if f not in names]
    if lacking:
        result.checked = False
        result.reason = (f"the accounting fields lack {', '.join(lacking)} (a line is matched"
                         f" on {', '.join(KEY_FIELDS)})")
        return result
    fmt = "csv" if "csv" in formats else next(f for f in formats if f in FORMATS)
    result.format = fmt
    position = read_position(directory, published=published)  # before the files: what it
    # names is in them
    feed = {str(w): int(n) for w, n in position.get("feed", {}).items()}
    since = {str(w): int(n) for w, n in position.get("first", {}).items()}
    lost = {str(w): (int(a), int(b)) for w, (a, b) in position.get("lost", {}).items()}
    have_position = "feed" in position
    paths = _files(directory, fmt)
    writing = {Path(p).name for p, _ in position.get("files", {}).values()}
    limits = {Path(p).name: int(size) for p, size in position.get("files", {}).values()}
    if paths:
        writing.add(paths[-1].name)  # rotated after the position was read
    result.files = len(paths)

    # 1. the files: one key per line, counted (a key twice goes to ``multi``)
    seen: dict[int, int] = {}
    multi: dict[int, int] = {}
    first = last = ""
    for line in _lines(paths, fmt, writing, result, limits):
        result.lines += 1
        key = _key(line.rtype, line.when, line.queue_id, line.rcpt)
        if key in seen:
            multi[key] = multi.get(key, 1) + 1
        else:
            seen[key] = 1
        if not first or line.when < first:
            first = line.when
        if line.when > last:
            last = line.when
    if not result.lines:
        return result
    result.span = (first, last)

    # 2. the store's records in that span, once, through its time index
    stored_multi: dict[int, int] = {}
    loose: dict[int, int] = {}  # pseudonymised / purged records: type, time, queue id only
    missing_seqs: list[int] = []
    lo = parse_time(first) - 0.002
    hi = parse_time(last) + 0.002
    for row in store.rows_between(lo, hi):
        when = format_time(row["time_logged"])
        if not first <= when <= last:
            continue
        writer, n = row.get("ev_writer"), int(row.get("ev_n") or 0)
        filed = True
        if writer is not None and have_position:
            span = lost.get(writer)
            filed = (since.get(writer, 1) <= n <= feed.get(writer, 0)
                     and not (span and span[0] <= n <= span[1]))
        rtype, queue_id = row["type"], row["queue_id"] or ""
        if row["state"] != INTACT:
            if filed:  # an unfiled one a line has is found again by ``_committed_since``
                part = _key(rtype, when, queue_id, None) >> 64
                loose[part] = loose.get(part, 0) + 1
            continue
        key = _key(rtype, when, queue_id, row["rcpt"] or "")
        if key in multi:
            stored_multi[key] = stored_multi.get(key, 0) + 1
            if stored_multi[key] > multi[key] and filed:
                missing_seqs.append(row["seq"])
        elif seen.get(key) == 1:
            seen[key] = 0
        elif filed:
            missing_seqs.append(row["seq"])
    # each distinct line: F lines, S records matched; a pseudonymised or purged record (type,
    # time and queue id alike) may be what an unmatched line is
    unmatched: set[int] = set()
    doubled: set[int] = set()
    for key, count in seen.items():
        lines = multi.get(key, 1)
        matched = min(lines, stored_multi.get(key, 0)) if key in multi else 1 - count
        part = key >> 64
        while matched < lines and loose.get(part):
            loose[part] -= 1
            matched += 1
        if lines > max(matched, 1):
            doubled.add(key)
        if not matched:
            unmatched.add(key)
    del seen, multi

    # 3. name what differs: the store's missing records, then a second pass over the files
    oldest = _oldest(store)
    for seq in missing_seqs:
        result.add("missing", _identity(store, seq))
    if any(loose.values()):  # pseudonymised or purged records no line had
        for row in store.rows_between(lo, hi):
            if row["state"] == INTACT:
                continue
            when = format_time(row["time_logged"])
            part = _key(row["type"], when, row["queue_id"] or "", None) >> 64
            if loose.get(part):
                loose[part] -= 1
                result.add("missing", f"{row['type']} {row['queue_id'] or '-'} to"
                           f" {row['rcpt'] or '(purged)'} at {when} (seq {row['seq']})")
    if unmatched or doubled:
        _name_lines(store, paths, fmt, writing, unmatched, doubled, oldest, result, limits)
    return result


def _oldest(store: AuditStore) -> str:
    rows = store.query("SELECT min(time_logged) FROM audit_records")
    return format_time(rows[0][0]) if rows and rows[0][0] is not None else ""


def _identity(store: AuditStore, seq: int) -> str:
    rows = store.query(f"SELECT type, queue_id, rcpt, time_logged FROM audit_records WHERE"
                       f" seq = {int(seq)}")
    rtype, queue_id, rcpt, when = rows[0]
    return f"{rtype} {queue_id or '-'} to {rcpt or '-'} at {format_time(when)} (seq {seq})"


def _name_lines(store: AuditStore, paths: list[Path], fmt: str, writing: set[str],
                unmatched: set[int], doubled: set[int], oldest: str,
                result: FilesCheck, limits: dict[str, int] | None = None) -> None:
    """Second pass over the files: where each unmatched and doubled line is."""
    where: dict[int, list[_Line]] = {k: [] for k in doubled}
    ignore = FilesCheck()  # the cut lines were told by the first pass
    for line in _lines(paths, fmt, writing, ignore, limits):
        key = _key(line.rtype, line.when, line.queue_id, line.rcpt)
        if key in where:
            where[key].append(line)
        if key not in unmatched:
            continue
        unmatched.discard(key)  # named once, at its first line
        if oldest and line.when < oldest:
            continue  # older than the store keeps: not judged
        if _committed_since(store, line):
            continue  # the node runs: the store has it now
        result.add("not_in_store", f"{line.path.name} line {line.number}: {line}")
    for lines in where.values():
        if len(lines) > 1:
            at = ", ".join(f"{ln.path.name} line {ln.number}" for ln in lines)
            result.add("doubled", f"{lines[0]} in {at}")


def _committed_since(store: AuditStore, line: _Line) -> bool:
    for row in store.find(Query(queue_id=line.queue_id)) if line.queue_id else []:
        if (row["type"], format_time(row["time_logged"])) == (line.rtype, line.when) and (
                (row["rcpt"] or "") == line.rcpt or row["state"] != INTACT):
            return True
    return False


# -- reading the files ----------------------------------------------------------------------------

def _files(directory: Path, fmt: str) -> list[Path]:
    """The files of ``fmt``, oldest first, and those deploy/accounting-archive.sh compressed
    (``acct-*.csv.gz``: rotated files still, kept for its KEEP_DAYS). A ``.gz`` beside its own
    uncompressed file is a gzip that did not finish (gzip removes the original last): the
    original is read."""
    plain = set(directory.glob(f"acct-*.{fmt}"))
    packed = {p for p in directory.glob(f"acct-*.{fmt}.gz") if p.with_suffix("") not in plain}
    return ordered(plain | packed)


def _open(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def _lines(paths: list[Path], fmt: str, writing: set[str], result: FilesCheck,
           limits: dict[str, int] | None = None) -> Iterator[_Line]:
    """Every whole record of the files, in order, those named in ``limits`` up to that many
    bytes; a line that is not one goes to ``result`` (the last, unfinished line of a file being
    written is skipped)."""
    for path in paths:
        try:
            with _open(path) as raw:
                limit = (limits or {}).get(path.name)
                fh = raw if limit is None else _upto(raw, limit)
                if fmt == "csv":
                    yield from _csv_lines(path, fh, path.name in writing, result)
                else:
                    yield from _json_lines(path, fh, path.name in writing, result)
        except (OSError, EOFError, zlib.error) as exc:  # the last two: a .gz cut or damaged
            why = getattr(exc, "strerror", None) or exc
            result.add("cut", f"{path.name}: cannot be read ({why})")


def _upto(fh: io.BufferedIOBase, limit: int) -> Iterator[bytes]:
    """The lines of ``fh`` in its first ``limit`` bytes."""
    for line in fh:
        if limit <= 0:
            return
        yield line[:limit]
        limit -= len(line)


def _bad(result: FilesCheck, path: Path, number: int, why: str) -> None:
    result.add("cut", f"{path.name} line {number}: {why}")


def _json_lines(path: Path, fh, writing: bool, result: FilesCheck) -> Iterator[_Line]:
    for number, raw in enumerate(fh, 1):
        if not raw.endswith(b"\n"):
            if not writing:
                _bad(result, path, number, "cut (no line break at the end of the file)")
            return
        try:
            obj = orjson.loads(raw)
            values = [obj[f] for f in KEY_FIELDS] if isinstance(obj, dict) else None
        except (orjson.JSONDecodeError, KeyError):
            values = None
        if not values or not _valid(values):
            _bad(result, path, number, "not a whole record")
            continue
        yield _Line(path, number, *values)


def _valid(values: list) -> bool:
    return (all(isinstance(v, str) for v in values) and values[0] in RECORD_TYPES
            and _TIME.fullmatch(values[1]) is not None)


def _csv_lines(path: Path, fh, writing: bool, result: FilesCheck) -> Iterator[_Line]:
    """CSV records (RFC 4180: a quoted field may hold line breaks). A record that does not
    parse to the header's width is named at its first line, and reading goes on at the line
    after it (a cut quoted field would otherwise swallow the records behind it)."""
    source = enumerate(fh, 1)
    back: list[tuple[int, bytes]] = []
    header: list[str] | None = None
    index: list[int] = []
    while True:
        item = back.pop() if back else next(source, None)
        if item is None:
            return
        group = [item]
        data = item[1]
        while data.count(b'"') % 2 and len(group) < _MAX_SPAN:
            more = back.pop() if back else next(source, None)
            if more is None:
                break
            group.append(more)
            data += more[1]
        number = item[0]
        if not data.endswith(b"\n"):
            if not (writing and (back == [] and len(group) == 1)):
                _bad(result, path, number, "cut (no line break at the end of the file)")
            if len(group) > 1:
                back.extend(reversed(group[1:]))
                continue
            return
        row = _csv_row(data)
        if header is None:
            header = row or []
            missing = [f for f in KEY_FIELDS if f not in header]
            if missing:
                result.add("cut", f"{path.name}: its header lacks {', '.join(missing)}: not"
                           " checked")
                return
            index = [header.index(f) for f in KEY_FIELDS]
            continue
        if row is None or len(row) != len(header) or not _valid([row[i] for i in index]):
            _bad(result, path, number, "not a whole record")
            back.extend(reversed(group[1:]))
            continue
        yield _Line(path, number, *(row[i] for i in index))


def _csv_row(data: bytes) -> list[str] | None:
    try:
        rows = list(csv.reader([data.decode()]))
    except (UnicodeDecodeError, csv.Error):
        return None
    return rows[0] if len(rows) == 1 else None
