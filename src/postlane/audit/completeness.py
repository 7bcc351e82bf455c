"""Completeness: the trail holds every record it should, not only records that were not altered.

The hash chain proves that what the store holds was not edited; it cannot see a record that
never reached it. Records written since hash scheme 2 are made from spool events numbered densely
per writer, which gives two proofs:

- **no event missing**: each writer's event numbers in the store run 1, 2, 3 … without a gap;
- **every fact has its records**: each recipient received (an "r") has a final record (delivered,
  bounced, expired, purged or suppressed at delivery) unless the spool still holds it open,
  every delivery, deferral, bounce or unknown attempt belongs to a received recipient, and every
  message the spool holds has its "r".

The second proof needs the spool (``-c CONFIG``). A node may be writing meanwhile: whatever looks
missing in the store's snapshot is looked for again, after the spool was read, among the records
committed since and the events still waiting in the spool, before it is called missing.

A recipient is one mailbox however its records spell it: they are matched by its key
(``address.address_key``, the store's indexed ``rcpt_key``), as everywhere else, not by SQL
``lower(rcpt)``, which folds ASCII only (SQLite; PostgreSQL under ``LC_CTYPE=C``) while the
spool's addresses were folded by Python, and which keeps A- and U-labels, NFC and NFD apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ..accounting.records import unpack
from .chain import PURGED

__all__ = ["SpoolView", "check"]

_FINAL = ("d", "b", "s")
"""A recipient's final record: delivered; bounced, expired or purged; or suppressed at
delivery (an "s" after its "r": the list stopped it while it waited). An "s" of intake stands
alone: that recipient was never queued, and has no "r"."""
_AFTER_R = ("d", "b", "t", "u")
_IN_FINAL = ", ".join(repr(t) for t in _FINAL)
_IN_AFTER_R = ", ".join(repr(t) for t in _AFTER_R)
_LIMIT = 20
"""Problems named at most (the first ones)."""
_KEY = "coalesce(rcpt_key, lower(coalesce(rcpt, '')))"
"""A record's recipient as compared: its key; a row a node of the release before wrote during a
rolling upgrade has none until the next start fills it in (``postgres._fill_rcpt_keys``)."""


class SpoolView(Protocol):
    """What completeness needs of the spool (``spool.outbox`` readers provide it)."""

    def open_recipients(self) -> set[tuple[str, str]]:
        """(queue id, address) of every recipient not yet final (compared by its key)."""
        ...

    def messages(self) -> set[str]:
        """Queue ids of every message the spool holds."""
        ...

    def all_writers(self) -> list[str]: ...

    def read(self, writer: str, after: int, limit: int) -> list[tuple[int, bytes]]: ...


@dataclass
class Completeness:
    ok: bool = True
    checked_events: int = 0
    writers: int = 0
    problems: list[str] = field(default_factory=list)

    def fail(self, text: str) -> None:
        self.ok = False
        if len(self.problems) < _LIMIT:
            self.problems.append(text)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "events": self.checked_events, "writers": self.writers,
                "problems": self.problems}


class _Reader(Protocol):
    def query(self, sql: str, args: Iterable = ()) -> list[tuple]: ...


def _pending(spool: SpoolView, cursors: dict[str, int]) -> set[tuple[str, str]]:
    """(queue id, recipient's key) of the events the spool holds beyond the store."""
    from .queries import rcpt_key  # here: queries imports store, which imports this module
    out = set()
    for writer in spool.all_writers():
        after = cursors.get(writer, 0)
        while rows := spool.read(writer, after, 20000):
            for _, data in rows:
                values = unpack(data)
                out.add((values[5], rcpt_key(values[4]) or ""))
            after = rows[-1][0]
    return out


def _files_ahead(reader: _Reader, mark: str, result: Completeness, spool: SpoolView,
                 filed: dict[str, int], highs: dict[str, int]) -> None:
    """Events the accounting files hold past the store's last one, and that the spool has let
    go (so they are not on their way): the store lost its last commits (a power loss)."""
    for writer, n in sorted(filed.items()):
        have = highs.get(writer, 0)
        if n <= have:
            continue
        nxt = spool.read(writer, have, 1)
        if nxt and nxt[0][0] == have + 1:
            continue  # still in the spool: the recorder writes it on
        again = reader.query("SELECT coalesce(max(ev_n), 0) FROM audit_records WHERE"
                             f" ev_writer = {mark}", (writer,))[0][0]
        if again >= n:
            continue  # committed meanwhile (the node runs)
        result.fail(f"event(s) {again + 1}..{n} of spool writer {writer} are in the accounting"
                    " files but not in the store, and the spool has let them go: the store"
                    " lost its last commits (a power loss?); the files hold their records")


def check(reader: _Reader, mark: str, cursors: dict[str, int],
          spool: SpoolView | None = None, filed: dict[str, int] | None = None) -> Completeness:
    """Check the store through ``reader`` (``mark``: its placeholder); ``cursors``: each
    writer's last event in the store; ``spool``: the node's spool, for the open recipients;
    ``filed``: each writer's last event in the node's accounting files (their position)."""
    result = Completeness()
    highs: dict[str, int] = {}
    for writer, count, low, high in reader.query(
            "SELECT ev_writer, count(*), min(ev_n), max(ev_n) FROM audit_records"
            " WHERE ev_writer IS NOT NULL GROUP BY ev_writer ORDER BY ev_writer"):
        highs[writer] = high
        result.writers += 1
        result.checked_events += count
        if low != 1 or count != high - low + 1:
            gap = reader.query(
                "SELECT n, nxt FROM (SELECT ev_n AS n, lead(ev_n) OVER (ORDER BY ev_n) AS nxt"
                f" FROM audit_records WHERE ev_writer = {mark}) g WHERE nxt > n + 1"
                " ORDER BY n LIMIT 1", (writer,))
            first, last = (1, low - 1) if low != 1 else (gap[0][0] + 1, gap[0][1] - 1)
            result.fail(f"event(s) {first}..{last} of spool writer {writer} are missing:"
                        " the records made from them never reached the store")
    if filed and spool is not None:
        _files_ahead(reader, mark, result, spool, filed, highs)
    rows = reader.query(
        f"SELECT queue_id, {_KEY}, min(rcpt), min(seq),"
        " sum(CASE WHEN type = 'r' THEN 1 ELSE 0 END),"
        f" sum(CASE WHEN type IN ({_IN_FINAL}) THEN 1 ELSE 0 END)"
        f" FROM audit_records WHERE scheme >= 2 AND state <> {PURGED}"
        f" AND type IN ({', '.join(repr(t) for t in ('r', *_AFTER_R, 's'))})"
        f" GROUP BY queue_id, {_KEY}"
        " HAVING (sum(CASE WHEN type = 'r' THEN 1 ELSE 0 END) = 0"
        f" AND sum(CASE WHEN type IN ({_IN_AFTER_R}) THEN 1 ELSE 0 END) > 0)"
        f" OR sum(CASE WHEN type IN ({_IN_FINAL}) THEN 1 ELSE 0 END)"
        " < sum(CASE WHEN type = 'r' THEN 1 ELSE 0 END)")
    top = reader.query("SELECT coalesce(max(seq), 0) FROM audit_records")[0][0]
    if spool is None:
        unreceived = [r for r in rows if r[4] == 0]
        for queue_id, _, rcpt, seq, _, _ in unreceived[:_LIMIT]:
            result.fail(f"record seq {seq} (message {queue_id} to {rcpt}) has no 'received'"
                        " record")
        return result  # without the spool, a recipient with no final record may be open
    from .queries import rcpt_key  # here: queries imports store, which imports this module
    open_ = {(queue_id, rcpt_key(address) or "")
             for queue_id, address in spool.open_recipients()}
    pending = _pending(spool, cursors)
    for queue_id, key_, rcpt, seq, received, _ in rows:
        key = (queue_id, key_)
        if key in pending or (received and key in open_):
            continue
        # committed after the snapshot (the node runs)? look again
        again = reader.query(
            "SELECT sum(CASE WHEN type = 'r' THEN 1 ELSE 0 END),"
            f" sum(CASE WHEN type IN ({_IN_FINAL}) THEN 1 ELSE 0 END)"
            f" FROM audit_records WHERE queue_id = {mark} AND {_KEY} = {mark}",
            (queue_id, key_))[0]
        if (again[0] or 0) and (again[1] or 0) >= (again[0] or 0):
            continue
        if not received and not again[0]:
            result.fail(f"record seq {seq} (message {queue_id} to {rcpt}) has no 'received'"
                        " record")
        elif not (again[1] or 0) >= (again[0] or 0):
            result.fail(f"message {queue_id} to {rcpt} (received, record seq {seq}) has no"
                        " final record (delivered, bounced, expired, purged or suppressed) and the"
                        " spool does not hold it open")
    received = {q for q, _ in pending}
    messages = sorted(spool.messages() - received)
    for start in range(0, len(messages), 500):
        chunk = messages[start:start + 500]
        found = {r[0] for r in reader.query(
            f"SELECT DISTINCT queue_id FROM audit_records WHERE type = 'r' AND queue_id IN"
            f" ({', '.join([mark] * len(chunk))})", chunk)}
        for queue_id in chunk:
            if queue_id not in found:
                result.fail(f"message {queue_id} is in the spool but has no 'received' record"
                            f" (store read up to seq {top})")
    return result
