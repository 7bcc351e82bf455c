"""What real submission clients send, as they send it: the defects found by running nodemailer,
curl, msmtp, swaks, PHPMailer and Python's smtplib against a node's submission listener, each
pinned here through real SMTP on loopback."""

from __future__ import annotations

import email.policy
from email.message import EmailMessage

from tests.conftest import config_text, send
from tests.support.rawsmtp import session


async def test_smtplib_bare_lf_message_keeps_its_leading_dots(tmp_path, sink, make_node):
    """``smtplib.sendmail(from, to, msg.as_bytes())`` sends the LF line endings of the default
    email policy as they are and stuffs a dot after each bare LF (``smtplib._quote_periods``),
    as for a line: Postfix, Exim and Sendmail end a line at a bare LF and take the dot off. The
    edge took it off only after CRLF, so ".NET" arrived as "..NET" and a lone "." as ".."."""
    node = await make_node(config_text(tmp_path, sink.port))
    msg = EmailMessage(policy=email.policy.default)
    msg["From"] = "sender@insurer.test"
    msg["To"] = "a@example.com"
    msg["Subject"] = "dots"
    msg.set_content("line one\n.\n.NET 8 is out\n...and more\nend\n")
    data = msg.as_bytes()
    assert b"\r\n" not in data and b"\n.NET" in data  # what smtplib is given: bare LFs
    assert await send(node.listeners[0].port, "sender@insurer.test", ["a@example.com"],
                      data) == {}
    [arrival] = await sink.wait_for(1)
    # (smtplib ends data that does not end in CRLF with one more)
    assert arrival.data.endswith(b"\r\n\r\nline one\r\n.\r\n.NET 8 is out\r\n...and more\r\n"
                                 b"end\r\n\r\n")


async def test_stuffed_dots_after_crlf_and_bare_lf_on_the_wire(tmp_path, sink, make_node):
    """The wire bytes: a stuffed dot is taken off after CRLF and after a bare LF, once; a dot
    after a bare CR is text (no client stuffs there, and Postfix does not end a line at CR)."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    for command in ("MAIL FROM:<s@insurer.test>", "RCPT TO:<a@example.com>", "DATA"):
        assert (await raw.cmd(command))[:1] in "23"
    raw.send(b"Subject: wire\r\n\r\na\r\n..crlf\nb\n..lf\n...two\r..cr\r\n.\r\n")
    assert (await raw.reply()).startswith("250 ")
    await raw.close()
    [arrival] = await sink.wait_for(1)
    assert arrival.data.endswith(b"\r\n\r\na\r\n.crlf\r\nb\r\n.lf\r\n..two\r\n..cr\r\n")


async def test_nodemailer_utf8_dsn_options_come_back_as_written(tmp_path, sink, make_node):
    """nodemailer's ``dsn: {id, notify, recipient}`` for a UTF-8 recipient, exactly as it sends
    it: ENVID and ORCPT xtext-encoded octet by octet. The success report's Original-Recipient
    and Original-Envelope-Id said ``\\x{C3}\\x{BC}nal`` for ``ünal``."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    for command in ("MAIL FROM:<jörg@example.com> SMTPUTF8 RET=FULL ENVID=+C3+AFd-1",
                    "RCPT TO:<ünal@example.com> NOTIFY=SUCCESS ORCPT=rfc822;+C3+BCnal@example.com",
                    "DATA"):
        assert (await raw.cmd(command.encode() + b"\r\n"))[:1] in "23"
    raw.send(b"From: j\xc3\xb6rg@example.com\r\nSubject: dsn\r\n\r\nx\r\n.\r\n")
    assert (await raw.reply()).startswith("250 ")
    await raw.close()
    await sink.wait_for(2)
    [report] = sink.for_rcpt("jörg@example.com")
    assert b"Original-Recipient: utf-8; \\x{FC}nal@example.com\r\n" in report.data
    assert b"Original-Envelope-Id: \\x{EF}d-1\r\n" in report.data
