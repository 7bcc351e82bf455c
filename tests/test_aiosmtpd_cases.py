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


async def test_a_protocol_from_the_template_is_what_aiosmtpds_init_makes(tmp_path, sink,
                                                                         make_node):
    """``edge/protocol.py`` runs aiosmtpd's ``__init__`` once per listener and copies what it
    set into every later connection's protocol: the copy must hold the same attributes, with
    the command and AUTH tables bound to the new protocol and its stream state its own. If a
    new aiosmtpd sets something else in ``__init__``, this fails."""
    from aiosmtpd.smtp import SMTP

    from postlane.edge.smtp import EdgeSMTP

    node = await make_node(config_text(tmp_path, sink.port))
    handler = node.listeners[0].handler
    kwargs = dict(data_size_limit=1000, enable_SMTPUTF8=True, decode_data=False,
                  hostname="node.test", ident="Postlane ESMTP", loop=asyncio.get_running_loop(),
                  **handler.guard.smtp_options())
    first, second = EdgeSMTP(handler, **kwargs), EdgeSMTP(handler, **kwargs)
    plain = EdgeSMTP.__new__(EdgeSMTP)
    SMTP.__init__(plain, handler, **kwargs)  # aiosmtpd's own, alone
    assert set(vars(second)) == set(vars(first))
    assert set(vars(plain)) <= set(vars(second))
    for name in ("_smtp_methods", "_auth_methods"):
        table = getattr(second, name)
        assert table.keys() == getattr(plain, name).keys() and table
    assert all(m.__self__ is second for m in second._smtp_methods.values())
    assert all(a.method.__self__ is second for a in second._auth_methods.values()
               if a.is_builtin)
    assert second._handle_hooks == plain._handle_hooks
    assert second._client_connected_cb.__self__ is second
    for name in ("_closed", "_drain_waiters", "_strong_reader", "dsn_params"):
        assert getattr(second, name) is not getattr(first, name), name
    for name, value in vars(plain).items():
        if name not in {"_smtp_methods", "_auth_methods", "_handle_hooks", "_closed",
                        "_drain_waiters", "_strong_reader", "_stream_reader_wr",
                        "_client_connected_cb"}:
            assert getattr(second, name) == value, name
    # and a session on it works end to end (the listener's own protocols come from it)
    assert await send(node.listeners[0].port, "s@insurer.test", ["a@example.com"],
                      b"Subject: t\r\n\r\nx\r\n") == {}
    assert await send(node.listeners[0].port, "s@insurer.test", ["b@example.com"],
                      b"Subject: t\r\n\r\ny\r\n") == {}
    await sink.wait_for(2)
