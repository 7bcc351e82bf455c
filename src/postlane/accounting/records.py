"""Accounting records: one audit-trail line per event and recipient (PowerMTA accounting style).

The file field names and time format follow PowerMTA so that existing log pipelines
(SIEM parsers, billing jobs) can read Postlane accounting files unchanged.
"""

from __future__ import annotations

import marshal
import operator
import time
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from ..config.fields import CORRELATION_HEADER_FIELD, DEFAULT_FIELDS, RECORD_TYPES

__all__ = [
    "CORRELATION_HEADER_FIELD",
    "DEFAULT_FIELDS",
    "RECORD_TYPES",
    "Record",
    "format_time",
    "pack",
    "parse_time",
    "unpack",
]

_last_second: tuple[int, str] = (-1, "")  # records come in bursts within one second


def format_time(ts: float) -> str:
    """PowerMTA-style UTC timestamp with milliseconds, e.g. "2026-11-27 18:40:01.123+0000"."""
    global _last_second
    secs, ms = divmod(round(ts * 1000), 1000)
    cached = _last_second  # one read, one write: safe from any thread
    if cached[0] != secs:
        cached = _last_second = (secs, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(secs)))
    return f"{cached[1]}.{ms:03d}+0000"


def parse_time(text: str) -> float:
    """Inverse of format_time, for tools that read accounting files back."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f%z").timestamp()


@dataclass(slots=True)
class Record:
    """One accounting event for one recipient; see RECORD_TYPES for ``type``."""

    type: str
    time_logged: float  # epoch seconds
    time_queued: float  # injection time
    orig: str  # envelope sender
    rcpt: str
    queue_id: str
    cls: str  # traffic class
    vmta_pool: str
    orcpt: str = ""
    dsn_action: str = ""  # relayed|delivered|failed|delayed (RFC 3464)
    dsn_status: str = ""  # e.g. 2.0.0, 4.2.1, 5.1.1
    dsn_diag: str = ""  # remote reply verbatim, e.g. "smtp;550 5.1.1 no such user"
    dsn_mta: str = ""  # e.g. "dns;mx1.example.com (127.0.0.5)"
    bounce_cat: str = ""
    src_type: str = "smtp"  # smtp|api
    src_mta: str = ""  # client's EHLO name / ip at intake
    dlv_source_ip: str = ""
    dlv_destination_ip: str = ""
    dlv_tls_protocol: str = ""
    dlv_tls_cipher: str = ""
    dlv_size: int = 0
    vmta: str = ""  # EHLO name of the source IP
    job_id: str = ""
    env_id: str = ""  # DSN ENVID
    correlation_id: str = ""
    message_id: str = ""
    attempt: int = 0
    total_seconds_queued: float = 0.0
    listener: str = ""
    auth_user: str = ""
    dlv_tls_auth: str = ""  # ""|none|pkix|dane-ee|dane-ta: how the peer was authenticated
    dlv_tls_policy: str = ""  # the outbound TLS policy that applied (opportunistic, dane …)
    operator: str = ""  # who ordered it, for records of an operator's action

    def __post_init__(self) -> None:
        # Fail at the producer, not in a downstream parser that meets an unknown type.
        if self.type not in RECORD_TYPES:
            raise ValueError(f"unknown accounting record type {self.type!r}")

    def as_dict(self) -> dict[str, str | int | float]:
        """File-ready values keyed by file field name, in DEFAULT_FIELDS order.

        Times are formatted strings; totalSecondsQueued is rounded to milliseconds. Spelled
        out rather than looped because this runs for every record on the hot path.
        """
        return {
            "type": self.type,
            "timeLogged": format_time(self.time_logged),
            "timeQueued": format_time(self.time_queued),
            "orig": self.orig,
            "rcpt": self.rcpt,
            "orcpt": self.orcpt,
            "dsnAction": self.dsn_action,
            "dsnStatus": self.dsn_status,
            "dsnDiag": self.dsn_diag,
            "dsnMta": self.dsn_mta,
            "bounceCat": self.bounce_cat,
            "srcType": self.src_type,
            "srcMta": self.src_mta,
            "dlvSourceIp": self.dlv_source_ip,
            "dlvDestinationIp": self.dlv_destination_ip,
            "dlvTlsProtocol": self.dlv_tls_protocol,
            "dlvTlsCipher": self.dlv_tls_cipher,
            "dlvTlsAuth": self.dlv_tls_auth,
            "dlvTlsPolicy": self.dlv_tls_policy,
            "dlvSize": self.dlv_size,
            "vmta": self.vmta,
            "vmtaPool": self.vmta_pool,
            "jobId": self.job_id,
            "envId": self.env_id,
            "queueId": self.queue_id,
            "class": self.cls,
            "messageId": self.message_id,
            "attempt": self.attempt,
            "totalSecondsQueued": round(self.total_seconds_queued, 3),
            "listener": self.listener,
            "authUser": self.auth_user,
            "operator": self.operator,
            CORRELATION_HEADER_FIELD: self.correlation_id,
        }


_VALUES = operator.attrgetter(*(f.name for f in fields(Record)))


def pack(record: Record) -> bytes:
    """A record as the bytes of a spool event: its field values in declaration order (the
    audit store's RECORD_COLUMNS order), marshalled (≈ 1 µs; no schema to agree on between
    the node and the recorder, which run the same code)."""
    return marshal.dumps(_VALUES(record))


def unpack(data: bytes) -> tuple[Any, ...]:
    """The field values of a packed record (``Record(*values)`` makes it again)."""
    values: tuple[Any, ...] = marshal.loads(data)
    return values
