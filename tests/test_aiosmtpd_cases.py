"""aiosmtpd's own SMTP smuggling and dot-stuffing test cases (aiosmtpd 1.4.6,
``aiosmtpd/tests/test_smtpsmuggling.py::TestSmuggling::test_smtp_smuggling`` and
``test_smtp.py::TestSMTPWithController::test_dots_escaped``), ported to run against Postlane's
edge, which replaces aiosmtpd's DATA reader (``edge/smtp.py``, ``BulkDataSMTP.smtp_DATA``) and
uses its private APIs: if a new aiosmtpd changes what the edge relies on, these fail.

aiosmtpd's smuggling test patches ``smtplib`` so that the client sends the bytes unquoted; this
port writes the same bytes on a raw connection instead (no global patch). Where aiosmtpd checks
its handler's mailbox, this checks what the node delivered to the sink.
"""

from __future__ import annotations

import asyncio
import smtplib

from tests.conftest import config_text, send

# test_smtpsmuggling.py's message, byte for byte: a fake "<LF>.<CR><LF>" end of data, then
# the text that must stay in the message
SMUGGLING = b"""\
From: Anne Person <anne@example.com>\r\n\
To: Bart Person <bart@example.com>\r\n\
Subject: A test\r\n\
Message-ID: <ant>\r\n\
\r\n\
Testing\
\n.\r\n\
NO SMUGGLING
\r\n.\r\n\
"""


async def _session(port: int, lines: list[bytes]) -> list[bytes]:
    """One reply per line sent (the greeting first), on a raw connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = [await reader.readline()]
    for line in lines:
        writer.write(line)
        await writer.drain()
        reply = await reader.readline()
        while reply[3:4] == b"-":  # a multi-line reply
            reply = await reader.readline()
        replies.append(reply)
    writer.close()
    return replies


async def test_smtp_smuggling(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    replies = await _session(node.listeners[0].port, [
        b"HELO example.com\r\n", b"MAIL FROM:<sender@example.com>\r\n",
        b"RCPT TO:<rcpt1@example.com>\r\n", b"DATA\r\n", SMUGGLING, b"QUIT\r\n"])
    assert [r[:3] for r in replies] == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]
    [arrival] = await sink.wait_for(1)
    assert b"NO SMUGGLING" in arrival.data  # aiosmtpd's assertion, on what was delivered
    assert arrival.rcpts == ["rcpt1@example.com"]


async def test_dots_escaped(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    mail = "\r\n".join(["Test", ".", "mail"])
    # smtplib dot-stuffs the lone "." line; the edge must take the stuffing off again, and
    # the relay put it back on the way out (the sink takes it off)
    assert await send(node.listeners[0].port, "anne@example.com", ["bart@example.com"],
                      mail.encode()) == {}
    [arrival] = await sink.wait_for(1)
    # aiosmtpd: content == mail + CRLF. The node adds its trace fields around a message
    # without a header/body separator, so here: the lines arrive intact, the dot unstuffed.
    assert b"\r\n" + (mail + "\r\n").encode() in arrival.data
    assert b"\r\n..\r\n" not in arrival.data


def test_smtplib_still_quotes_periods() -> None:
    """The dot test relies on the stdlib client stuffing dots (aiosmtpd's does too)."""
    assert smtplib._quote_periods(b"a\r\n.\r\nb") == b"a\r\n..\r\nb"
