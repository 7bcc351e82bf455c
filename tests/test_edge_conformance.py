"""RFC 5321 conformance of the SMTP edge, inbound and outbound, found by probing with raw bytes
(the h-edge audit): each test sends the exact bytes that showed a defect."""

from __future__ import annotations

import pytest

from tests.conftest import config_text
from tests.support.rawsmtp import RawSMTP, session

# -- a refused EHLO/HELO leaves the session as it was (RFC 5321 4.1.4) -----------------------

@pytest.mark.parametrize("line", [b"EHLO bad\x01name\r\n", b"HELO bad name\r\n",
                                  b"EHLO -bad.example\r\n"], ids=["EHLO ctl", "HELO space",
                                                                 "EHLO hyphen"])
async def test_a_refused_ehlo_keeps_the_transaction_and_the_extensions(tmp_path, sink, make_node,
                                                                      line):
    """RFC 5321 4.1.4: after a 501 to EHLO "the SMTP server MUST stay in the same state ...
    that it was in before the EHLO was received". aiosmtpd reset the transaction (and, for
    EHLO, dropped ESMTP) before the name was checked: the MAIL and RCPT already answered 250
    were gone, DATA got 503 and the message text was read as commands."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    assert (await raw.cmd("MAIL FROM:<s@insurer.test> RET=HDRS")).startswith("250 2.1.0")
    assert (await raw.cmd("RCPT TO:<a@example.com>")).startswith("250 2.1.5")
    assert (await raw.cmd(line)).startswith("501 5.5.2")
    # still in the transaction, still ESMTP (a DSN parameter needs EHLO)
    assert (await raw.cmd("RCPT TO:<b@example.com> NOTIFY=NEVER")).startswith("250 2.1.5")
    assert (await raw.cmd("DATA")).startswith("354")
    raw.send(b"Subject: kept\r\n\r\nhi\r\n.\r\n")
    assert (await raw.reply()).startswith("250 2.0.0")
    await raw.close()
    [arrival] = await sink.wait_for(1)
    assert sorted(arrival.rcpts) == ["a@example.com", "b@example.com"]


async def test_a_refused_helo_before_any_greeting_still_needs_one(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await RawSMTP.connect(node.listeners[0].port)
    assert (await raw.reply()).startswith("220")
    assert (await raw.cmd(b"EHLO bad\x00\r\n")).startswith("501 5.5.2")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("503")
    assert (await raw.cmd("EHLO good.example")).startswith("250")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250 2.1.0")
    await raw.close()
