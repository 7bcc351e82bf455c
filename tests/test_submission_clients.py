"""What real submission clients send, as they send it: the defects found by running nodemailer,
curl, msmtp, swaks, PHPMailer and Python's smtplib against a node's submission listener, each
pinned here through real SMTP on loopback."""

from __future__ import annotations

import asyncio
import email.policy
import smtplib
from email.message import EmailMessage

import pytest

from postlane.policy.users import User, hash_password, save_user
from tests.conftest import config_text, send
from tests.support.rawsmtp import session
from tests.test_security_auth import (  # noqa: F401  (fixture)
    PASSWORD,
    _client_ctx,
    secure_config,
    submit,
    tls_files,
)


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
    """The wire bytes: a line's first dot is taken off after CRLF and after a bare LF, once,
    stuffed or not (RFC 5321 4.5.2: a client that did not stuff loses it, as through Postfix,
    Exim and Sendmail; it was kept); a dot after a bare CR is text (no client stuffs there, and
    Postfix does not end a line at CR)."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    for command in ("MAIL FROM:<s@insurer.test>", "RCPT TO:<a@example.com>", "DATA"):
        assert (await raw.cmd(command))[:1] in "23"
    raw.send(b"Subject: wire\r\n\r\na\r\n..crlf\nb\n..lf\n...two\r..cr\r\n.one\n.lf\r\n"
             b".\n\r\n.\r\n")
    assert (await raw.reply()).startswith("250 ")
    await raw.close()
    [arrival] = await sink.wait_for(1)
    assert arrival.data.endswith(b"\r\n\r\na\r\n.crlf\r\nb\r\n.lf\r\n..two\r\n..cr\r\n"
                                 b"one\r\nlf\r\n\r\n\r\n")


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


async def test_lf_line_endings_are_lines_for_the_line_and_header_limits(tmp_path, sink,
                                                                         make_node):
    """``smtplib.sendmail(from, to, msg.as_bytes())`` (the email package's default policy
    writes LF line endings, CRLF nowhere) and curl uploading a Unix file send a message without
    a single CRLF. Intake makes each bare LF a line break, but the limits looked for CRLF: the
    whole message was one line, refused with ``500 5.5.2 Line too long`` past 998 octets (curl
    reports "Weird server reply"), and a message bigger than ``max_header_size`` had no end to
    its header block (552 5.3.4)."""
    node = await make_node(config_text(
        tmp_path, sink.port, '[listeners.in.limits]\nmax_header_size = "8KB"\n'))
    port = node.listeners[0].port
    msg = EmailMessage(policy=email.policy.default)
    msg["From"] = "sender@insurer.test"
    msg["To"] = "a@example.com"
    msg["Subject"] = "policy notice"
    msg.set_content("Dear customer,\n" + "A short line of a policy notice.\n" * 600)
    data = msg.as_bytes()
    assert b"\r" not in data and len(data) > 16 * 1024
    assert await send(port, "sender@insurer.test", ["a@example.com"], data) == {}
    [arrival] = await sink.wait_for(1)
    assert arrival.data.count(b"A short line of a policy notice.\r\n") == 600
    # the limits still hold where the lines are long: one line of 999 octets between LFs ...
    raw = await session(port)
    for command in ("MAIL FROM:<s@insurer.test>", "RCPT TO:<a@example.com>", "DATA"):
        assert (await raw.cmd(command))[:1] in "23"
    raw.send(b"Subject: x\n\nshort\n" + b"a" * 999 + b"\nshort\r\n.\r\n")
    assert (await raw.reply()).startswith("500 5.5.2")
    # ... and a header block over 8 KB, its lines ending in LF
    for command in ("MAIL FROM:<s@insurer.test>", "RCPT TO:<a@example.com>", "DATA"):
        assert (await raw.cmd(command))[:1] in "23"
    raw.send(b"Subject: x\n" + b"X-Filler: abc\n" * 700 + b"\nbody\r\n.\r\n")
    assert (await raw.reply()).startswith("552 5.3.4")
    await raw.close()


async def test_sender_domains_and_rules_compare_idna_domains_in_a_labels(tmp_path, sink,
                                                                        make_node, tls_files):  # noqa: F811
    """A user allowed to send from ``bücher.example`` was refused ``550 5.7.1 may not send
    from`` when its client gave the A-label (``a@xn--bcher-kva.example``, as every client
    without SMTPUTF8 writes it), and a user configured with the A-label was refused the U-label
    nodemailer sends in an SMTPUTF8 transaction; a classification rule with a U-label domain
    never matched (intake compares in A-labels)."""
    users = tmp_path / "users.toml"
    hashed = hash_password(PASSWORD)
    save_user(users, User("ulabel", hashed, [], None, ["bücher.example"]))
    save_user(users, User("alabel", hashed, [], "policy-documents", ["xn--bcher-kva.example"]))
    node = await make_node(secure_config(
        tmp_path, sink.port, tls_files, users, relay_from="[]",
        extra='[[classification.rules]]\nclass = "policy-documents"\n'
              'from_domain = "bücher.example"\n'))
    port = node.listeners[1].port

    def mail_from(user: str, sender: str, options: list[str]) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            client.starttls(context=_client_ctx())
            client.ehlo("client.test")
            client.login(user, PASSWORD)
            return client.mail(sender, options)[0]

    for user in ("ulabel", "alabel"):
        assert await asyncio.to_thread(mail_from, user, "a@xn--bcher-kva.example", []) == 250
        assert await asyncio.to_thread(mail_from, user, "a@bücher.example", ["SMTPUTF8"]) == 250
        assert await asyncio.to_thread(mail_from, user, "a@insurer.test", []) == 550
    data = b"From: a@xn--bcher-kva.example\r\nSubject: rule\r\n\r\nx\r\n"
    assert await submit(port, tls="starttls", user="ulabel", mail_from="a@xn--bcher-kva.example",
                        data=data) == {}
    [arrival] = await sink.wait_for(1)
    assert arrival.peer == "127.0.0.20"  # the rule's class's pool, not the default (marketing)


async def test_data_sent_a_line_at_a_time_is_acknowledged_at_once(tmp_path, sink, make_node,
                                                                  monkeypatch):
    """PHPMailer writes DATA a line per send without TCP_NODELAY, so Nagle holds each next line
    until the node ACKs, and Linux delays that ACK ~40 ms: ~48 ms per message on one
    connection against ~5 for smtplib. While DATA is read every packet is acknowledged at once
    (TCP_QUICKACK); commands are not (their reply carries the ACK)."""
    from postlane.edge.guard import QUICKACK, GuardedSMTP

    if QUICKACK is None:
        pytest.skip("TCP_QUICKACK is Linux only")
    acks: list[bool] = []
    ack_now = GuardedSMTP._ack_now

    def spy(self: GuardedSMTP) -> None:
        ack_now(self)
        acks.append(self._quickack is not None)  # the socket took the option

    monkeypatch.setattr(GuardedSMTP, "_ack_now", spy)
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    for command in ("MAIL FROM:<s@insurer.test>", "RCPT TO:<a@example.com>", "DATA"):
        assert (await raw.cmd(command))[:1] in "23"
    assert acks == []
    for line in (b"Subject: lines\r\n", b"\r\n", b"one\r\n", b"two\r\n"):
        raw.send(line)
        await raw.writer.drain()
        await asyncio.sleep(0.05)  # each line its own packet, as a Nagle client's first is
    raw.send(b".\r\n")
    assert (await raw.reply()).startswith("250 ")
    await raw.close()
    [arrival] = await sink.wait_for(1)
    assert arrival.data.endswith(b"one\r\ntwo\r\n")
    assert len(acks) >= 4 and all(acks)
