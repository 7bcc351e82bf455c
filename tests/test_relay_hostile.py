"""The relay against hostile and odd receivers, end to end through a node (the scripted
receiver of ``tests/test_relay_quirks.py``): whatever the receiver says, each recipient ends
delivered, deferred or bounced with a record whose status is a valid RFC 3463 code, the node
logs no traceback, and a receiver's misbehaviour never counts against the next message."""

from __future__ import annotations

from tests.conftest import message, records, send
from tests.support.waiting import until
from tests.test_relay_quirks import (
    CLOSE,
    EHLO,
    Conversation,
    no_tracebacks,
    outcomes,
    quick_config,
)
from tests.test_relay_quirks import receiver  # noqa: F401  (fixture)


def _rows(tmp_path, rcpt: str) -> list[dict]:
    return [r for r in records(tmp_path) if r["type"] not in ("r", "o") and r["rcpt"] == rcpt]


async def test_a_size_of_thousands_of_digits_is_no_limit(tmp_path, make_node, receiver,
                                                         caplog):
    """``250 SIZE 999…9`` (5,000 digits): larger than any message, so no limit. Python's int()
    refuses strings of more than 4,300 digits: the ValueError escaped the EHLO parser, every
    attempt was deferred "451 4.3.0 internal error during delivery" with a traceback in the
    log, and the next MX was never tried."""
    receiver.ehlo = b"250-quirk.test\r\n250-PIPELINING\r\n250 SIZE " + b"9" * 5000 + b"\r\n"
    port = await receiver.start()
    node = await make_node(quick_config(tmp_path, port))
    await send(node.listeners[0].port, "s@insurer.test", ["a@example.com"],
               message(cls="policy-documents"))
    await until(lambda: outcomes(tmp_path), what="an outcome")
    await node.stop()
    assert outcomes(tmp_path) == [("a@example.com", "d")], records(tmp_path)
    no_tracebacks(caplog)
