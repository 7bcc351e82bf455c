"""The vocabulary of accounting records an operator configures: record types and file fields.
Config validates against it; accounting implements it (``accounting/records.py`` re-exports)."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["CORRELATION_HEADER_FIELD", "DEFAULT_FIELDS", "RECORD_TYPES", "resolve_fields"]

#: r received, d delivered, t transient failure (deferred), b bounced (an expired recipient is a
#: "b" with bounce_cat "message-expired", dsn_status "4.4.7", dsn_action "failed"), rb remote
#: (asynchronous) bounce, rd remote delivery report (the receiving side's success DSN, asked for
#: with NOTIFY=SUCCESS, back at the VERP address), f feedback/complaint, s suppressed, u outcome
#: unknown (an attempt started, the final dot may have been sent, and the node stopped before
#: recording the reply), o an operator's action (pause, resume, hold, release, retry, suppress
#: …; see operations.py).
RECORD_TYPES: frozenset[str] = frozenset({"r", "d", "t", "b", "rb", "rd", "f", "s", "u", "o"})

CORRELATION_HEADER_FIELD = "header_X-Correlation-ID"

#: File field names, in the default column order (PowerMTA names where PowerMTA has one).
DEFAULT_FIELDS: tuple[str, ...] = (
    "type",
    "timeLogged",
    "timeQueued",
    "orig",
    "rcpt",
    "orcpt",
    "dsnAction",
    "dsnStatus",
    "dsnDiag",
    "dsnMta",
    "bounceCat",
    "srcType",
    "srcMta",
    "dlvSourceIp",
    "dlvDestinationIp",
    "dlvTlsProtocol",
    "dlvTlsCipher",
    "dlvTlsAuth",
    "dlvTlsPolicy",
    "dlvSize",
    "vmta",
    "vmtaPool",
    "jobId",
    "envId",
    "queueId",
    "class",
    "messageId",
    "attempt",
    "totalSecondsQueued",
    "listener",
    "authUser",
    "operator",
    CORRELATION_HEADER_FIELD,
)

# "header_" + an RFC 5322 field name (printable ASCII except colon).
_HEADER_FIELD = re.compile(r"header_[\x21-\x39\x3b-\x7e]+")


def resolve_fields(fields: Sequence[str]) -> list[tuple[str, str | None]]:
    """Map each configured field to its as_dict key (None: a header Postlane does not keep)."""
    if not fields:
        raise ValueError("accounting field list is empty")
    known = set(DEFAULT_FIELDS)
    seen: set[str] = set()
    out: list[tuple[str, str | None]] = []
    for name in fields:
        if name in seen:
            raise ValueError(f"duplicate accounting field {name!r}")
        seen.add(name)
        if name in known:
            out.append((name, name))
        elif name.lower() == CORRELATION_HEADER_FIELD.lower():
            out.append((name, CORRELATION_HEADER_FIELD))
        elif _HEADER_FIELD.fullmatch(name):
            out.append((name, None))
        else:
            raise ValueError(f"unknown accounting field {name!r}")
    return out
