"""What an ``asyncio.StreamReader`` holds unread: asyncio has no public peek, and both ends of
Postlane's SMTP need one (the edge's pregreet test, the relay's STARTTLS injection check)."""

from __future__ import annotations

import asyncio

__all__ = ["pending_bytes"]


def pending_bytes(reader: asyncio.StreamReader) -> int:
    """How many bytes ``reader`` has received that nobody has read yet.

    Reads the private ``_buffer`` (a bytearray in CPython's StreamReader): a read would block
    on a peer that waits its turn, and the checks must see early bytes without consuming them.
    One place, so a change in asyncio breaks one function (and its tests: the pregreet test in
    ``tests/test_edge_hardening.py``, the STARTTLS one in ``tests/test_relay_client.py``)."""
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined]  # private: no public peek
    return len(buffer)
