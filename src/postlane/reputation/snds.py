"""Microsoft SNDS (Smart Network Data Services) automated-access importer: the per-IP CSV that
the "Automated Access" page's data URL serves, one line per IP and activity period.

Columns (no header line): IP address, activity start, activity end, RCPT commands, DATA
commands, message recipients, filter result (GREEN / YELLOW / RED), complaint rate ("< 0.1%" or
e.g. "0.4%"), trap message period start, trap message period end, trap hits, sample HELO,
JMR P1 sender (sample MAIL FROM), comments. Times are given as ``M/D/YYYY h:mm AM``; the CSV
names no zone, so they are taken as UTC.

The URL carries the access key: messages name the host at most, never the URL.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import logging
import math
import re
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx

from ..config.model import SNDSConfig
from .postmaster import ImportFailed

__all__ = ["drop_future", "fetch_snds", "parse_snds"]

_FILTERS = ("GREEN", "YELLOW", "RED")
_KEY = re.compile(r"(?i)([?&]key=)[^&\s\"']+")


class _RedactKey(logging.Filter):
    """httpx logs every request's URL at INFO: the SNDS access key must not reach the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if _KEY.search(text):
            record.msg, record.args = _KEY.sub(r"\1***", text), ()
        return True


logging.getLogger("httpx").addFilter(_RedactKey())


def _when(text: str) -> float:
    for fmt in ("%m/%d/%Y %I:%M %p", "%m/%d/%Y %H:%M", "%m/%d/%Y"):
        try:
            return datetime.strptime(text.strip(), fmt).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    raise ValueError(f"not an SNDS time: {text[:40]!r}")


def _ratio(text: str) -> float:
    """``"0.4%"`` -> 0.004; ``"< 0.1%"`` (below what SNDS reports) -> 0.0. A rate that is not
    a percentage from 0 to 100 (``nan%``, ``-5%``, ``500%``) is refused: a NaN reached the API,
    whose JSON cannot hold one (HTTP 500), and the gauges."""
    text = text.strip()
    if not text or text.startswith("<"):
        return 0.0
    try:
        value = float(text.rstrip("%").strip())
    except ValueError:
        value = math.nan
    if not 0 <= value <= 100:  # False for NaN
        raise ValueError(f"complaint rate {text[:20]!r} is not a percentage")
    return value / 100


def _count(text: str, what: str) -> int:
    """A count: digits only (a negative count or one too large to store is refused)."""
    text = text.strip()
    if not text:
        return 0
    if not re.fullmatch(r"\d{1,18}", text):
        raise ValueError(f"{what} {text[:20]!r} is not a count")
    return int(text)


def parse_snds(text: str, now: float | None = None) -> list[dict]:
    """Rows for ``ReputationStore.put_snds``; a line that is not data (a header) is skipped,
    a data line that does not parse raises ``ImportFailed`` naming the line. With ``now``,
    periods starting more than a day later are dropped (``drop_future``)."""
    rows: list[dict] = []
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff")))  # a BOM hid the first IP
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # a field beyond csv's limit, a broken quote
            raise ImportFailed(f"SNDS data line {reader.line_num}: {exc}") from None
        n = reader.line_num
        if not fields or not fields[0].strip():
            continue
        try:
            ip = str(ipaddress.ip_address(fields[0].strip()))
        except ValueError:
            if n == 1:
                continue  # a header line
            raise ImportFailed(f"SNDS data line {n}: {fields[0][:40]!r} is not an IP address")\
                from None
        fields += [""] * (14 - len(fields))
        try:
            filt = fields[6].strip().upper()
            if filt not in _FILTERS:
                raise ValueError(f"filter result {filt[:20]!r} is not GREEN, YELLOW or RED")
            start, end = _when(fields[1]), _when(fields[2])
            if end < start:
                raise ValueError(f"the activity ends ({fields[2].strip()[:20]}) before it"
                                 f" starts ({fields[1].strip()[:20]})")
            rows.append({
                "ip": ip, "period_start": start, "period_end": end,
                "rcpt_commands": _count(fields[3], "RCPT commands"),
                "data_commands": _count(fields[4], "DATA commands"),
                "recipients": _count(fields[5], "recipients"), "filter": filt,
                "complaint_rate": fields[7].strip()[:20], "complaint_ratio": _ratio(fields[7]),
                "trap_hits": _count(fields[10], "trap hits"), "helo": fields[11].strip()[:255],
                "mail_from": fields[12].strip()[:255], "comments": fields[13].strip()[:500]})
        except ValueError as exc:
            raise ImportFailed(f"SNDS data line {n}: {exc}") from None
    return rows if now is None else drop_future(rows, now)


def drop_future(rows: list[dict], now: float) -> list[dict]:
    """Periods starting at most a day after ``now``: a wrong date would stay "the latest
    period" of its IP, and a RED one its alert, for good."""
    return [r for r in rows if r["period_start"] <= now + 86400]


def fetch_snds(cfg: SNDSConfig) -> list[dict]:
    """Read the data URL; raises ``ImportFailed`` (the message names the host, not the key)."""
    host = urlsplit(cfg.url or "").hostname or "?"
    try:
        resp = httpx.get(cfg.url or "", timeout=cfg.timeout, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise ImportFailed(f"SNDS at {host} unreachable: {type(exc).__name__}") from None
    if not resp.is_success:
        raise ImportFailed(f"SNDS at {host} answered HTTP {resp.status_code}"
                           " (is the access key still valid?)")
    text = resp.text
    if text.lstrip().startswith("<"):
        raise ImportFailed(f"SNDS at {host} sent a page, not CSV data (is the access key"
                           " still valid?)")
    return parse_snds(text, time.time())
