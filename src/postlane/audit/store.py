"""The audit store contract: what every backend (``sqlite.SQLiteAuditStore``, the embedded
one; ``postgres.PostgresAuditStore``, a cluster's) offers the rest of Postlane, and the values it
takes and returns. ``backend.open_audit_store`` picks the backend from the config.

What does not depend on the backend is beside it, one concept a module, so the backends cannot
drift apart: ``linking`` (how a batch is hashed, linked and de-duplicated, how a chain is
walked), ``queries`` (the SQL both backends build: evidence look-ups, pauses, seals),
``retention`` (how retention rewrites rows). Readers (the CLI, webhooks) use their own
connections and never block the writer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..accounting.records import Record
from .chain import CHAIN_COLUMNS, EXTRA_COLUMNS, RECORD_COLUMNS, Problem
from .completeness import Completeness, SpoolView
from .seal import Seal

__all__ = ["COLUMNS", "KEY_COLUMNS", "AuditStore", "Entry", "Query", "Retention", "StoreMissing",
           "StoreOutdated", "VerifyResult"]

KEY_COLUMNS: tuple[str, ...] = ("rcpt_key",)
"""Look-up keys the store derives from a record when it writes it, not content (no hash covers
them): ``rcpt_key`` is ``address.address_key`` of the recipient, the one form the rest of
Postlane compares addresses in, indexed, so a look-up by recipient finds ``JÖRG@exämple.com`` as
``jörg@xn--exmple-cua.com`` without the database folding case (SQLite's NOCASE and lower()
under a C ctype fold ASCII only). Retention rewrites it with ``rcpt``."""

COLUMNS: tuple[str, ...] = CHAIN_COLUMNS + RECORD_COLUMNS + EXTRA_COLUMNS + KEY_COLUMNS
"""The columns of ``audit_records`` in both backends, in order."""


@dataclass(slots=True)
class Query:
    """Evidence look-up: any combination of keys; times bound the message's queue time."""

    queue_id: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    env_id: str | None = None
    rcpt: str | None = None
    cls: str | None = None
    pool: str | None = None
    since: float | None = None
    until: float | None = None


@dataclass(slots=True)
class Retention:
    """Per class: pseudonymise and/or delete records this many seconds after queueing."""

    pseudonymise: float | None = None
    delete: float | None = None


@dataclass
class VerifyResult:
    ok: bool
    checked: int
    problem: Problem | None
    first_seq: int | None
    last_seq: int | None
    head: str
    pseudonymised: int = 0
    purged: int = 0
    days: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "checked": self.checked,
                "problem": str(self.problem) if self.problem else None,
                "first_seq": self.first_seq, "last_seq": self.last_seq, "head": self.head,
                "pseudonymised": self.pseudonymised, "purged": self.purged}


class AuditStore(Protocol):
    def append(self, batch: Sequence[Entry]) -> int: ...

    def feed_cursors(self) -> dict[str, int]:
        """Each spool writer's last event number the store holds (see ``Entry``)."""
        ...

    def completeness(self, spool: SpoolView | None = None,
                     filed: dict[str, int] | None = None) -> Completeness: ...

    def seals(self) -> list[Seal]: ...

    def add_seal(self, seal: Seal) -> None: ...

    def row_at(self, seq: int) -> tuple | None: ...

    def query(self, sql: str, args: Iterable = ()) -> list[tuple]:
        """Rows of a read-only statement (the backend's placeholders)."""
        ...

    def records_of(self, writer: str, first: int, last: int) -> list[tuple[int, Record]]:
        """The records of spool events ``first..last`` of ``writer`` held, in event order."""
        ...

    def find(self, query: Query) -> list[dict]: ...

    def rows_between(self, since: float | None, until: float | None,
                     cls: str | None = None) -> Iterator[dict]: ...

    def rows_after(self, seq: int, types: Sequence[str], classes: Sequence[str],
                   limit: int) -> tuple[list[dict], int]: ...

    def verify(self, since_day: str | None = None) -> VerifyResult: ...

    def days(self) -> list[dict]: ...

    def purges(self) -> list[dict]: ...

    def pauses(self, pool: str, until: float) -> list[tuple[float, float, str]]: ...

    def classes(self) -> list[str]: ...

    def purge(self, policies: Mapping[str, Retention], key: bytes | None,
              now: float) -> dict[str, dict[str, int]]: ...

    def cursor(self, name: str) -> int: ...

    def set_cursor(self, name: str, seq: int) -> None: ...

    def hold_cursor(self, name: str) -> bool:
        """Whether this instance may deliver (and move) cursor ``name``: with several nodes on
        one store, one webhook sender at a time does."""
        ...

    def close(self) -> None: ...


class StoreMissing(FileNotFoundError):
    """A read-only open found no audit store (no file, or no audit tables in the schema)."""


class StoreOutdated(StoreMissing):
    """A read-only open found a store of an older schema (a node, or ``postlane upgrade``,
    migrates it)."""


Entry = tuple
"""What ``append`` takes per record: ``(record, sla)``, or ``(record, sla, writer, n)`` for a
record made from spool event ``n`` of ``writer`` (the evidence outbox). ``record`` is a Record
or its RECORD_COLUMNS values. The store keeps each writer's last event number beside the
records, in the same transaction, and skips events it already holds: a replay after a crash
(the recorder cannot know whether its last append committed) adds nothing."""
