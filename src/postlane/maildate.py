"""Dates for mail headers (RFC 5322 3.3): UTC written as ``+0000``. ``email.utils.formatdate``
writes ``-0000``, which says the sender does not know its zone; receivers (Postfix among them)
write ``+0000`` for UTC, and so does every header Postlane makes."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import format_datetime

__all__ = ["header_date"]

_cache: tuple[int, str] = (0, "")


def header_date(ts: float | None = None) -> str:
    """``ts`` (default: now) to whole seconds, made once per second: intake stamps every
    message's Received (and a Date when it has none)."""
    global _cache
    second = int(time.time() if ts is None else ts)
    cached = _cache  # read once: another thread may replace it meanwhile
    if cached[0] != second:
        cached = _cache = (second, format_datetime(datetime.fromtimestamp(second, UTC)))
    return cached[1]
