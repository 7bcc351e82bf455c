"""Chaining, the same on every backend: how a batch of records is hashed (``prepare``, before
the append lock), which of its events the store holds already (``fresh``: a replay after a crash
adds nothing), how it is linked after the tail (``link``) and how a chain and its day seals are
walked (``walk``, ``check_days``)."""

from __future__ import annotations

import operator
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from ..accounting.records import Record
from .chain import (
    EXTRA_COLUMNS,
    FLOATS,
    GENESIS,
    HASHED,
    INTACT,
    PERSONAL,
    RECORD_COLUMNS,
    SCHEME,
    ChainLookup,
    ChainVerifier,
    Problem,
    chain_hash,
    content_digest,
    personal_digest,
)
from .queries import rcpt_key
from .store import Entry, VerifyResult

__all__ = ["Prepared", "check_days", "day_of", "fresh", "link", "prepare", "walk"]

_RECORD_GETTER = operator.attrgetter(*RECORD_COLUMNS)
_FLOAT_POSITIONS = [i for i, c in enumerate(RECORD_COLUMNS) if c in FLOATS]
_PERSONAL_POSITIONS = [RECORD_COLUMNS.index(c) for c in PERSONAL]
_RCPT_POSITION = RECORD_COLUMNS.index("rcpt")
_HASHED_POSITIONS = [(RECORD_COLUMNS + EXTRA_COLUMNS).index(c) for c in HASHED]
"""Where each HASHED value is in a record's values followed by its EXTRA_COLUMNS values."""


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


#: A record ready to be chained: its RECORD_COLUMNS values, its EXTRA_COLUMNS values, nonce,
#: pdigest, content digest and time_logged (everything its hash needs but the previous hash),
#: then its KEY_COLUMNS values (not hashed).
Prepared = tuple[list, tuple, bytes, bytes, bytes, float, tuple]


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
    urandom, fields, rcpt_at = os.urandom, _RECORD_GETTER, _RCPT_POSITION
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
        out.append((row, extra, nonce, pdigest, content_digest(hashed, pdigest), row[1],
                    (rcpt_key(row[rcpt_at]),)))
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
    for row, extra, nonce, pdigest, cdigest, logged, keys in prepared:
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
        rows.append((seq, day, prev, digest, INTACT, nonce, pdigest, None, SCHEME, *row, *extra,
                     *keys))
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
        unsealed, got = next(iter(seen.items()))
        verifier.problem = Problem(got[0], "inserted", f"day {unsealed} has no seal")
        return False
    return True
