"""The audit hash chain: what a record's hash covers, and how a chain is checked.

Backend-neutral (the SQLite store and a later PostgreSQL store share it). A stored row is a dict
with the Record fields (same names as the dataclass) plus the chain columns below.

Hashes (all SHA-256, stored as 32 raw bytes):

- ``pdigest = H(nonce || json([rcpt, orcpt, dsn_diag]))`` — the personal fields, salted with a
  random per-row nonce so that the digest cannot be matched against a list of addresses once the
  nonce is dropped (pseudonymisation drops it).
- ``cdigest = H(json(other fields) || pdigest)`` — the whole content. Fields equal to their
  dataclass default are left out, so adding a field to Record later leaves old hashes valid.
- ``hash = H(prev || cdigest)`` where ``prev`` is the hash of the record before it (32 zero bytes
  for the very first). Records are grouped in days; a day's first record links to the previous
  day's last one, so each day is anchored in the next.

Retention keeps what it removes provable: pseudonymising replaces the personal fields but keeps
``pdigest``; deleting keeps only ``cdigest`` (a tombstone). Either way ``hash`` still checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..records import Record

__all__ = [
    "CHAIN_COLUMNS",
    "GENESIS",
    "INTACT",
    "PERSONAL",
    "PSEUDONYMISED",
    "PURGED",
    "RECORD_COLUMNS",
    "ChainLookup",
    "ChainVerifier",
    "Problem",
    "chain_hash",
    "content_digest",
    "personal_digest",
    "pseudonym",
    "pseudonymise_row",
]

GENESIS = bytes(32)
INTACT, PSEUDONYMISED, PURGED = 0, 1, 2
PERSONAL: tuple[str, ...] = ("rcpt", "orcpt", "dsn_diag")

_KINDS = {"str": str, "int": int, "float": float}
#: (column, python type, default or MISSING) for every Record field, in dataclass order.
_FIELDS: tuple[tuple[str, type, object], ...] = tuple(
    (f.name, _KINDS[str(f.type)], f.default) for f in dataclasses.fields(Record))
RECORD_COLUMNS: tuple[str, ...] = tuple(name for name, _, _ in _FIELDS)
#: Extra content columns the store adds to each record (included in the hash): the class's SLA
#: in seconds at the time the record was written (None if the class had none).
EXTRA_COLUMNS: tuple[str, ...] = ("sla",)
CHAIN_COLUMNS: tuple[str, ...] = ("seq", "day", "prev", "hash", "state", "nonce", "pdigest",
                                  "cdigest")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def personal_digest(nonce: bytes, row: Mapping[str, object]) -> bytes:
    return _sha(nonce + _dumps([row[name] or "" for name in PERSONAL]).encode())


def content_digest(row: Mapping[str, object], pdigest: bytes) -> bytes:
    content: dict[str, object] = {}
    for name, kind, default in _FIELDS:
        if name in PERSONAL:
            continue
        value = row[name]
        value = kind(value) if value is not None else kind()
        if value != default:
            content[name] = value
    if row["sla"] is not None:
        content["sla"] = float(row["sla"])  # type: ignore[arg-type]
    return _sha(_dumps(content).encode() + pdigest)


def chain_hash(prev: bytes, cdigest: bytes) -> bytes:
    return _sha(prev + cdigest)


def pseudonym(key: bytes, address: str) -> str:
    """A keyed hash of the local part, keeping the domain (per-provider statistics stay
    possible; the person is not identifiable without the key)."""
    if not address:
        return ""
    domain = address.rpartition("@")[2] if "@" in address else ""
    tag = hmac.new(key, address.lower().encode(), hashlib.sha256).hexdigest()[:32]
    return f"pseud-{tag}" + (f"@{domain.lower()}" if domain else "")


def pseudonymise_row(row: Mapping[str, object], key: bytes) -> dict[str, object]:
    """The replacement values for a row's personal fields (addresses echoed in the remote reply
    are replaced too, so the reply stays readable as evidence of the cause)."""
    rcpt, orcpt = str(row["rcpt"] or ""), str(row["orcpt"] or "")
    diag = str(row["dsn_diag"] or "")
    for addr in sorted({a for a in (rcpt, orcpt.rpartition(";")[2]) if a}, key=len, reverse=True):
        diag = re.sub(re.escape(addr), pseudonym(key, addr), diag, flags=re.IGNORECASE)
    orcpt_new = ""
    if orcpt:
        kind, sep, addr = orcpt.rpartition(";")
        orcpt_new = f"{kind}{sep}{pseudonym(key, addr)}"
    return {"rcpt": pseudonym(key, rcpt), "orcpt": orcpt_new, "dsn_diag": diag, "nonce": None,
            "state": PSEUDONYMISED}


def row_cdigest(row: Mapping[str, object]) -> tuple[bytes, str]:
    """The content digest a row proves, and a complaint if its own fields contradict it."""
    state = row["state"]
    if state == PURGED:
        return bytes(row["cdigest"]), ""  # type: ignore[arg-type]
    pdigest = bytes(row["pdigest"])  # type: ignore[arg-type]
    problem = ""
    if state == INTACT and personal_digest(bytes(row["nonce"]), row) != pdigest:  # type: ignore[arg-type]
        problem = "a personal field (rcpt, orcpt or dsnDiag) was altered"
    return content_digest(row, pdigest), problem


@dataclass(slots=True)
class Problem:
    seq: int
    kind: str  # altered | inserted | removed | reordered | day
    detail: str

    def __str__(self) -> str:
        return f"record seq {self.seq}: {self.kind}: {self.detail}"


class ChainLookup(Protocol):
    """Whole-store look-ups, used only once a link is broken (to name what happened)."""

    def seqs_with_hash(self, digest: bytes) -> list[int]: ...

    def seqs_linking_to(self, digest: bytes) -> list[int]: ...


@dataclass
class ChainVerifier:
    """Walks rows in chain (seq) order and names the first thing that is wrong."""

    lookup: ChainLookup
    checked: int = 0
    pseudonymised: int = 0
    purged: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head: bytes = GENESIS
    problem: Problem | None = None
    _expected: bytes | None = None
    _last: tuple[int, bytes, bytes] | None = field(default=None, repr=False)  # seq, prev, hash

    def start(self, anchor: bytes | None) -> None:
        """Begin at a day boundary: the first row must link to ``anchor`` (None: trust it)."""
        self._expected = anchor

    def feed(self, rows: Iterable[Mapping[str, object]]) -> bool:
        """Check rows in order; False once a problem is found (see ``problem``)."""
        return all(self._check(row) for row in rows)

    def _check(self, row: Mapping[str, object]) -> bool:
        seq = int(row["seq"])  # type: ignore[arg-type]
        prev, stored = bytes(row["prev"]), bytes(row["hash"])  # type: ignore[arg-type]
        cdigest, complaint = row_cdigest(row)
        if complaint:
            return self._fail(seq, "altered", complaint)
        if chain_hash(prev, cdigest) != stored:
            return self._fail(seq, "altered", "its content does not match its hash")
        if self._expected is not None and prev != self._expected:
            return self._diagnose(seq, prev, stored)
        if self._last is not None and seq != self._last[0] + 1:
            return self._fail(seq, "inserted", "rows around it were renumbered (seq gap)")
        self._expected = stored
        self._last = (seq, prev, stored)
        self.checked += 1
        if self.first_seq is None:
            self.first_seq = seq
        self.last_seq = seq
        self.head = stored
        if row["state"] == PSEUDONYMISED:
            self.pseudonymised += 1
        elif row["state"] == PURGED:
            self.purged += 1
        return True

    def _diagnose(self, seq: int, prev: bytes, stored: bytes) -> bool:
        """Row ``seq`` does not link to the row before it: say why, as precisely as we can."""
        last = self._last
        if last is not None and seq != last[0] + 1:
            return self._fail(seq, "removed",
                              f"record(s) seq {last[0] + 1}..{seq - 1} before it are missing")
        twins = [s for s in self.lookup.seqs_with_hash(stored) if s != seq]
        if twins:
            return self._fail(seq, "inserted", f"it is a copy of record seq {twins[0]}")
        if last is not None and prev == last[1]:
            return self._fail(last[0], "inserted", f"record seq {seq} links past it to the "
                              "record before it")
        if self.lookup.seqs_with_hash(prev):
            other = self.lookup.seqs_with_hash(prev)[0]
            return self._fail(seq, "reordered", f"it follows record seq {other} in the chain, "
                              "which is stored elsewhere")
        if last is not None and [s for s in self.lookup.seqs_linking_to(last[2]) if s != seq]:
            return self._fail(seq, "inserted", "the chain continues past it from the record "
                              "before it")
        return self._fail(seq, "removed", "the record it links to is missing")

    def _fail(self, seq: int, kind: str, detail: str) -> bool:
        self.problem = Problem(seq, kind, detail)
        return False
