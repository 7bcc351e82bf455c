"""The SQL both audit backends build, with the driver's placeholder (``mark``) as a parameter:
evidence look-ups (``find_sql``), time ranges (``between_where``), the classes, an operator's
pauses (``pauses_sql``, ``pause_spans``), seals (``SEAL_COLS``, ``seal_row``, ``row_at``); and
a stored row read back as a ``Record`` (``row_record``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from ..accounting.records import Record
from ..address import address_key, spellings
from .chain import RECORD_COLUMNS
from .seal import Seal
from .store import Query

__all__ = ["CLASSES_SQL", "SEAL_COLS", "between_where", "find_sql", "pause_spans", "records_of",
           "pauses_sql", "rcpt_key", "rcpt_spellings", "row_at", "row_record", "seal_row"]

_RECORD_KINDS = {f.name: {"str": str, "int": int, "float": float}[str(f.type)]
                 for f in dataclasses.fields(Record) if f.name in RECORD_COLUMNS}


def row_record(row: Mapping[str, object]) -> Record:
    """A stored row as a Record (purged fields come back empty), for PowerMTA-style output."""
    values = {}
    for name, kind in _RECORD_KINDS.items():
        value = row[name]
        values[name] = kind(value) if value is not None else kind()
    return Record(**values)


def between_where(since: float | None, until: float | None, cls: str | None,
                  mark: str) -> tuple[str, list]:
    """The WHERE clause of ``rows_between`` for both backends (``mark``: the placeholder)."""
    where, args = ["1 = 1"], []
    for clause, value in ((f"time_logged >= {mark}", since), (f"time_logged < {mark}", until),
                          (f"cls = {mark}", cls)):
        if value is not None:
            where.append(clause)
            args.append(value)
    return " AND ".join(where), args


def rcpt_key(rcpt: str | None) -> str | None:
    """The ``rcpt_key`` column of a record (``store.KEY_COLUMNS``): ``address.address_key`` of
    its recipient, None without one. Never raises: a record is written whatever its text."""
    if not rcpt:
        return None
    try:
        return address_key(rcpt)
    except Exception:  # noqa: BLE001 - text the key cannot take (lone surrogates): lower-cased
        return rcpt.lower()


def rcpt_spellings(rcpt: str) -> list[str]:
    """The spellings a recipient may be stored in where only the text as stored is at hand
    (a pseudonym is a hash of it; the API's in-memory look-ups): the domain as given, in
    A-labels and in U-labels (``address.spellings``; records keep the address as the client
    gave it) and a non-ASCII local part as given and lower-cased."""
    local = rcpt.rpartition("@")[0]
    return list(dict.fromkeys(spelling for part in dict.fromkeys((local, local.lower()))
                              for spelling in spellings(part + rcpt[len(local):])))


def find_sql(query: Query, mark: str) -> tuple[str, list]:
    """The evidence query of both backends: ``mark`` is the driver's placeholder. A recipient
    is compared by its key (``rcpt_key``, indexed), not by the database's case folding."""
    where: list[str] = []
    args: list = []
    keys = {"queue_id": query.queue_id, "message_id": query.message_id,
            "correlation_id": query.correlation_id, "env_id": query.env_id,
            "cls": query.cls, "vmta_pool": query.pool}
    for col, value in keys.items():
        if value is not None:
            where.append(f"{col} = {mark}")
            args.append(value)
    if query.env_id is not None:
        where.append("env_id <> ''")
    key = rcpt_key(query.rcpt) if query.rcpt is not None else None
    if query.rcpt is not None:
        where.append(f"rcpt_key = {mark}")
        args.append(key)
    if query.since is not None:
        where.append(f"time_queued >= {mark}")
        args.append(query.since)
    if query.until is not None:
        where.append(f"time_queued < {mark}")
        args.append(query.until)
    if not where:
        raise ValueError("an evidence query needs at least one key or a time range")
    if not any(keys[k] is not None for k in ("queue_id", "message_id", "correlation_id",
                                              "env_id")) and query.rcpt is None:
        # a class, pool or time scan (the SLA report): the "r" rows name every message, and
        # the literal lets the database use the partial indexes on them
        where.insert(0, "type = 'r'")
    sql = (f"SELECT * FROM audit_records WHERE queue_id IN (SELECT queue_id FROM "
           f"audit_records WHERE {' AND '.join(where)})")
    if query.rcpt is not None:
        sql += f" AND rcpt_key = {mark}"
        args.append(key)
    return sql, args


CLASSES_SQL = ("SELECT DISTINCT cls FROM audit_records WHERE cls IS NOT NULL AND cls <> ''"
               " ORDER BY cls")
"""The classes in the store (records of actions on a pool or the suppression list have none)."""


def pauses_sql(mark: str) -> str:
    """The pauses and resumes of one pool before a time (parameters: pool, time, pool, time),
    as (time, action, domain) oldest first: the operators' chained "o" records (domain from
    ``*@DOMAIN``, "*" for the whole pool) and the unchained ``audit_operations`` table that
    stores written before them kept. ``mark``: the driver's placeholder."""
    return (f"SELECT time, action, domain FROM audit_operations WHERE pool = {mark}"
            f" AND time < {mark} UNION ALL SELECT time_logged, dsn_action, CASE WHEN"
            " coalesce(rcpt, '') = '' THEN '*' ELSE substr(rcpt, 3) END FROM audit_records"
            f" WHERE type = 'o' AND vmta_pool = {mark} AND time_logged < {mark}"
            " AND dsn_action IN ('pause', 'resume') ORDER BY 1")


def pause_spans(operations: Iterable[Sequence], until: float) -> list[tuple[float, float, str]]:
    """Pair (time, action, domain) operations, oldest first, into (start, end, domain) pauses;
    a pause not yet resumed ends at ``until``."""
    out: list[tuple[float, float, str]] = []
    started: dict[str, float] = {}
    for when, action, domain in operations:
        if action == "pause":
            started.setdefault(domain, when)
        elif action == "resume" and domain in started:
            out.append((started.pop(domain), when, domain))
    out.extend((start, until, domain) for domain, start in started.items())
    return sorted(out)


class SQLReader(Protocol):
    """A backend's plain query: rows of ``sql`` with ``args`` as tuples."""

    def query(self, sql: str, args: Iterable = ()) -> list[tuple]: ...


SEAL_COLS = "day, last_seq, records, head, sealed_at, key_id, signature, tsa"


def seal_row(seal: Seal) -> tuple:
    return (seal.day, seal.last_seq, seal.records, seal.head, seal.sealed_at, seal.key_id,
            seal.signature, seal.tsa)


def seal_from_row(r: Sequence[Any]) -> Seal:
    """The inverse of ``seal_row`` for a row read back as ``SEAL_COLS`` (the driver may hand
    the blobs back as memoryview, hence bytes())."""
    return Seal(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]),
                bytes(r[7]) if r[7] is not None else None)


def row_at(store: SQLReader, mark: str, seq: int) -> tuple | None:
    """(hash, day, records of that day up to it) of record ``seq``, for seal checks; None
    if there is no such record or its day was never sealed."""
    row = store.query(f"SELECT hash, day FROM audit_records WHERE seq = {mark}", (seq,))
    if not row:
        return None
    first = store.query(f"SELECT first_seq FROM audit_days WHERE day = {mark}", (row[0][1],))
    count = store.query(f"SELECT count(*) FROM audit_records WHERE day = {mark} AND seq <="
                        f" {mark}", (row[0][1], seq))[0][0]
    return (row[0][0], row[0][1], count) if first else None


def records_of(store: SQLReader, mark: str, writer: str, first: int,
               last: int) -> list[tuple[int, Record]]:
    """The records of spool events ``first..last`` of ``writer`` the store holds, in event
    order (the accounting files write again lines a torn file lost)."""
    names = list(_RECORD_KINDS)
    rows = store.query(f"SELECT ev_n, {', '.join(names)} FROM audit_records WHERE ev_writer ="
                       f" {mark} AND ev_n BETWEEN {mark} AND {mark} ORDER BY ev_n",
                       (writer, first, last))
    return [(row[0], row_record(dict(zip(names, row[1:], strict=True)))) for row in rows]
