"""RFC 5321 conformance of the SMTP edge, inbound and outbound, found by probing with raw bytes
(the h-edge audit): each test sends the exact bytes that showed a defect."""

from __future__ import annotations

import asyncio
import base64
import logging
import smtplib
import sqlite3
from email.message import EmailMessage

import pytest

from tests.conftest import config_text, message
from tests.support.rawsmtp import RawSMTP, session
from tests.support.waiting import until
from tests.test_security_auth import (  # noqa: F401  (fixtures tls_files, users_file)
    PASSWORD,
    _client_ctx,
    secure_config,
    tls_files,
    users_file,
)

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


# -- AUTH inside a mail transaction (RFC 4954 4) ----------------------------------------------

async def _submission(tmp_path, sink, make_node, tls, users) -> RawSMTP:
    """A session on a node's submission listener (AUTH offered), after STARTTLS and EHLO."""
    node = await make_node(secure_config(tmp_path, sink.port, tls, users,
                                         relay_from="[]"))
    raw = await session(node.listeners[1].port)
    assert (await raw.cmd("STARTTLS")).startswith("220")
    await raw.writer.start_tls(_client_ctx())
    assert (await raw.cmd("EHLO client.test")).startswith("250")
    return raw


async def test_auth_during_a_transaction_is_503_and_cannot_launder_a_sender(
        tmp_path, sink, make_node, tls_files, users_file):  # noqa: F811
    """RFC 4954 4: "An AUTH command issued during a mail transaction MUST be rejected with a 503
    reply". aiosmtpd took it: a stranger gave ``MAIL FROM:<ceo@other.test>`` unauthenticated
    (no sender check without a user), then AUTH as alice (``sender_domains`` insurer.test
    only), and the RCPT was relayed with the foreign sender alice may not use."""
    raw = await _submission(tmp_path, sink, make_node, tls_files, users_file)
    assert (await raw.cmd("MAIL FROM:<ceo@other.test>")).startswith("250 2.1.0")
    blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    assert (await raw.cmd(f"AUTH PLAIN {blob}")).startswith("503 5.5.1")
    assert (await raw.cmd("RCPT TO:<a@example.com>")).startswith("550 5.7.1")
    # after RSET the same AUTH goes through, and the sender is checked against the user
    assert (await raw.cmd("RSET")).startswith("250")
    assert (await raw.cmd(f"AUTH PLAIN {blob}")).startswith("235")
    assert (await raw.cmd("MAIL FROM:<ceo@other.test>")).startswith("550 5.7.1")
    await raw.close()
    assert not sink.arrivals


# -- an unknown parameter is 555, a malformed one 501 (RFC 5321 4.1.1.11, 4.1.2) -------------

@pytest.mark.parametrize(("params", "code"), [
    ("X-FOO=1", "555 5.5.4"), ("HOLDFOR=10", "555 5.5.4"), ("REQUIRETLS", "555 5.5.4"),
    ("x_y=1", "501 5.5.4"), ("-X=1", "501 5.5.4"), ("X-FOO=", "501 5.5.4"),
    ("SIZE=10 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=e1", "250 2.1.0")])
async def test_mail_parameters_unknown_or_malformed(tmp_path, sink, make_node, params, code):
    """``X-FOO=1`` is a well-formed esmtp-keyword (ALPHA/DIGIT then "-" allowed) that the
    server does not implement: 555. aiosmtpd answered 501 "Syntax", as if it were malformed,
    to any keyword with a hyphen (``isalnum``)."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    assert (await raw.cmd(f"MAIL FROM:<s@insurer.test> {params}")).startswith(code)
    assert (await raw.cmd("RSET")).startswith("250")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    reply = await raw.cmd(f"RCPT TO:<a@example.com> {params}")
    assert reply.startswith("555 5.5.4" if code.startswith("250") else code), reply
    await raw.close()


async def test_an_unknown_parameter_after_helo_is_501(tmp_path, sink, make_node):
    """Without EHLO there are no parameters at all: a syntax error, not an unknown one."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await RawSMTP.connect(node.listeners[0].port)
    assert (await raw.reply()).startswith("220")
    assert (await raw.cmd("HELO client.test")).startswith("250")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test> X-FOO=1")).startswith("501 5.5.4")
    await raw.close()


# -- an AUTH response over the line limit (RFC 4954 6: 500 5.5.6) ----------------------------

@pytest.mark.parametrize("split", [False, True], ids=["one-write", "line-end-later"])
async def test_an_over_long_auth_response_is_500_5_5_6_and_the_session_goes_on(
        tmp_path, sink, make_node, tls_files, users_file, caplog, split):  # noqa: F811
    """aiosmtpd read the response to a 334 with ``readline``, which raised ValueError past the
    reader's limit: a traceback logged at ERROR for each (a client wrote the log at will), a
    reply in Python's words (``500 Error: (ValueError) Separator is not found ...``), and,
    when the line's end came later, its rest read as one more command (a second reply)."""
    raw = await _submission(tmp_path, sink, make_node, tls_files, users_file)
    for command in ("AUTH LOGIN", "AUTH PLAIN", "AUTH LOGIN YWxpY2U="):
        assert (await raw.cmd(command)).startswith("334")
        if split:
            raw.send(b"QUFB" * 750)
            await asyncio.sleep(0.2)
            raw.send(b"QUFB\r\n")
        else:
            raw.send(b"QUFB" * 750 + b"\r\n")
        assert (await raw.reply()) == "500 5.5.6 Authentication Exchange line is too long\r\n"
        assert (await raw.cmd("NOOP")).startswith("250 2.0.0")
    blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    assert (await raw.cmd(f"AUTH PLAIN {blob}")).startswith("235")
    await raw.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- parameter values that are not ASCII digits (RFC 1870 SIZE, RFC 6710 MT-PRIORITY) ---------

@pytest.mark.parametrize("params", ["MT-PRIORITY=+-5", "MT-PRIORITY=²", "MT-PRIORITY=٣",
                                    "SIZE=²", "SIZE=١٢", "SMTPUTF8 SIZE=²", "BODY=8BİTMIME"])
async def test_a_parameter_value_that_is_not_ascii_digits_is_501(tmp_path, sink, make_node,
                                                                 caplog, params):
    """``isdigit`` holds for ``²`` and ``٣`` and ``lstrip("+-")`` let ``+-5`` through, then
    ``int()`` raised: a traceback at ERROR per command and ``500 5.5.2 Error: (ValueError)
    invalid literal for int()`` in reply; ``SIZE=١٢`` (Arabic-Indic digits) was taken. RFC
    1870's size-value and RFC 6710's priority are ASCII digits."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    reply = await raw.cmd(f"MAIL FROM:<s@insurer.test> {params}".encode() + b"\r\n")
    assert reply.startswith("501 5.5.4"), reply
    assert (await raw.cmd("MAIL FROM:<s@insurer.test> SIZE=10 MT-PRIORITY=-9")).startswith(
        "250 2.1.0")
    await raw.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- an IPv6 zone index is no address literal (RFC 5321 4.1.3) -------------------------------

@pytest.mark.parametrize("name", [b"[IPv6:fe80::1%a\rX-Injected: y]", b"fe80::1%a b",
                                  b"[IPv6:fe80::1%eth0]", b"[IPv6:::1%\xc3\x84]"])
async def test_an_ehlo_literal_with_a_zone_index_is_501(tmp_path, sink, make_node, name):
    """Python's ``ip_address`` takes ``fe80::1%<anything>`` (a scope id since 3.9): a CR, a
    space or a colon after the ``%`` passed the EHLO check, and ``Intake.submit`` had to mask
    them in the Received field (``from [IPv6:fe80::1%a?X-Injected:?y]``)."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await RawSMTP.connect(node.listeners[0].port)
    assert (await raw.reply()).startswith("220")
    assert (await raw.cmd(b"EHLO " + name + b"\r\n")).startswith("501 5.5.2")
    assert (await raw.cmd(b"HELO " + name + b"\r\n")).startswith("501 5.5.2")
    assert (await raw.cmd("EHLO [IPv6:fe80::1]")).startswith("250")
    await raw.close()


async def test_a_path_literal_with_a_zone_index_is_501(tmp_path, sink, make_node):
    """The same in paths: ``RCPT TO:<a@[IPv6:fe80::1%a b]>`` was taken (and relayed as it is,
    a space inside the path)."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    assert (await raw.cmd("MAIL FROM:<s@[IPv6:fe80::1%x]>")).startswith("501 5.1.7")
    assert (await raw.cmd("MAIL FROM:<s@[IPv6:fe80::1]>")).startswith("250 2.1.0")
    assert (await raw.cmd("RCPT TO:<a@[IPv6:fe80::1%a b]>")).startswith("501 5.1.3")
    await raw.close()


@pytest.mark.parametrize("mechanism", ["plain", "Plain", "login"])
async def test_the_auth_mechanism_is_taken_in_any_case(
        tmp_path, sink, make_node, tls_files, users_file, mechanism):  # noqa: F811
    """``AUTH plain <blob>`` got ``504 5.5.4 Unrecognized authentication type`` (and counted as
    a bad command): aiosmtpd looked the name up as sent."""
    raw = await _submission(tmp_path, sink, make_node, tls_files, users_file)
    if mechanism == "login":
        assert (await raw.cmd("AUTH login")).startswith("334")
        assert (await raw.cmd(base64.b64encode(b"alice").decode())).startswith("334")
        reply = await raw.cmd(base64.b64encode(PASSWORD.encode()).decode())
    else:
        blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        reply = await raw.cmd(f"AUTH {mechanism} {blob}")
    assert reply.startswith("235 2.7.0"), reply
    await raw.close()


# -- a fault of the node at MAIL or RCPT is 451, never 500 (RFC 5321 4.2.1, 4.3.2) -----------

async def test_a_failing_store_at_rcpt_or_mail_is_451_not_500(tmp_path, sink, make_node,
                                                              monkeypatch):
    """The suppression lookup at RCPT reads the database: when it failed (``database is
    locked``, an I/O error) aiosmtpd answered ``500 5.5.2 Error: (OperationalError) ...``, a
    permanent syntax error for the node's own transient fault: a peer bounces the recipient,
    and 20 of them closed the session as a bad client. The same at MAIL (the free-space check
    failing). Now 451 4.3.0, and the session goes on once the store answers."""
    node = await make_node(config_text(tmp_path, sink.port))
    suppression = node.feedback.suppression

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    raw = await session(node.listeners[0].port)
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    with monkeypatch.context() as patch:
        patch.setattr(suppression, "check_one", broken)
        for _ in range(25):  # more than max_bad_commands: not counted as the client's errors
            assert (await raw.cmd("RCPT TO:<a@example.com>")).startswith("451 4.3.0")
    assert (await raw.cmd("RCPT TO:<a@example.com>")).startswith("250 2.1.5")
    assert (await raw.cmd("RSET")).startswith("250")
    with monkeypatch.context() as patch:
        patch.setattr(node.intake.disk, "ok", broken)
        assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("451 4.3.0")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    await raw.close()


# -- refusals that cost nothing hold no slot for ever ----------------------------------------

def _stranger_config(tmp_path, sink_port: int) -> str:
    return config_text(tmp_path, sink_port, "[listeners.in.limits]\npregreet_wait = 0\n"
                       "max_junk_commands = 5\nmax_bad_commands = 3\n").replace(
        'relay_from = ["127.0.0.0/8"]', "relay_from = []")


async def test_relaying_denied_over_and_over_ends_the_session(tmp_path, sink, make_node):
    """A stranger repeating ``RCPT TO:<x@example.com>`` got ``550 5.7.1 Relaying denied``
    500 times in a row, each resetting the idle clock: a slot held for ever, at no cost,
    where Postfix's smtpd_hard_error_limit counts every such reject. They now count as junk
    (``max_junk_commands``, reset by an accepted message), then as bad commands."""
    node = await make_node(_stranger_config(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    raw.send(b"RCPT TO:<x@example.com>\r\n" * 12)
    replies = [await raw.reply() for _ in range(9)]
    assert [r[:9] for r in replies] == ["550 5.7.1"] * 8 + ["421 4.7.0"]
    assert await raw.closed()


async def test_unknown_parameters_over_and_over_end_the_session(tmp_path, sink, make_node):
    """``555`` (a parameter not implemented) is the client's error like ``501``: counted."""
    node = await make_node(_stranger_config(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    raw.send(b"MAIL FROM:<s@insurer.test> X-A=1\r\n" * 5)
    replies = [await raw.reply() for _ in range(4)]
    assert [r[:9] for r in replies] == ["555 5.5.4"] * 3 + ["421 4.7.0"]
    assert await raw.closed()


# -- STARTTLS where TLS is not offered --------------------------------------------------------

async def test_starttls_on_a_listener_without_tls_is_502_and_the_session_goes_on(
        tmp_path, sink, make_node):
    """``tls = "none"``: STARTTLS got ``454 4.7.0 TLS not available`` and the connection was
    closed (the guard took aiosmtpd's return for a handshake cut short, and logged "TLS
    handshake failed"). A client that tries it without reading EHLO lost its session; the
    command is not implemented here: 502, and the session goes on in plaintext."""
    node = await make_node(config_text(tmp_path, sink.port).replace(
        'relay_from = ["127.0.0.0/8"]', 'relay_from = ["127.0.0.0/8"]\ntls = "none"'))
    raw = await session(node.listeners[0].port)
    assert (await raw.cmd("STARTTLS")).startswith("502 5.5.1")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250 2.1.0")
    await raw.close()


# -- a repeated SMTPUTF8, BODY or SIZE that says the same thing (smtplib's send_message) -------

@pytest.mark.parametrize("option", ["SMTPUTF8", "BODY=8BITMIME", "smtputf8"])
async def test_send_message_with_its_own_smtputf8_option_is_delivered(tmp_path, sink, make_node,
                                                                     option):
    """smtplib's ``send_message`` adds ``SMTPUTF8 BODY=8BITMIME`` itself for a message with a
    non-ASCII address, after the caller's ``mail_options``: a caller that asked for SMTPUTF8
    sent it twice and got 501 "SMTPUTF8 given more than once" (Postfix takes a repeated
    SMTPUTF8, BODY or SIZE; it refuses only a repeated DSN parameter)."""
    node = await make_node(config_text(tmp_path, sink.port))
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "sender@insurer.test", "jürgen@example.com", "Grüße"
    msg.set_content("Hallo.\n")

    def submit() -> dict:
        with smtplib.SMTP("127.0.0.1", node.listeners[0].port, timeout=30) as client:
            return client.send_message(msg, mail_options=[option])

    assert await asyncio.to_thread(submit) == {}
    [arrival] = await sink.wait_for(1)
    assert arrival.rcpts == ["jürgen@example.com"]


async def test_a_repeated_parameter_with_another_value_is_still_501(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    for params in ("SIZE=10 SIZE=20", "BODY=7BIT BODY=8BITMIME", "SMTPUTF8 SMTPUTF8=X"):
        assert (await raw.cmd(f"MAIL FROM:<s@insurer.test> {params}")).startswith("501 5.5.4")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test> SIZE=10 size=10 SMTPUTF8 SMTPUTF8")
            ).startswith("250 2.1.0")
    await raw.close()


# -- ENVID needs a value (RFC 3461 4.4: "ENVID=" xtext) ---------------------------------------

async def test_envid_without_a_value_is_501(tmp_path, sink, make_node):
    """``MAIL FROM:<...> ENVID`` (no "=") got 250, and a DSN later had no ENVID to give back."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    assert (await raw.cmd("MAIL FROM:<s@insurer.test> ENVID")).startswith("501 5.5.4")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test> RET")).startswith("501 5.5.4")
    assert (await raw.cmd("MAIL FROM:<s@insurer.test> ENVID=e1")).startswith("250 2.1.0")
    await raw.close()


# -- a reply line is printable US-ASCII, at most 512 octets (RFC 5321 4.2, 4.5.3.1.5) ---------

async def _raw_reply(raw: RawSMTP) -> bytes:
    """One reply line as bytes (RawSMTP.reply decodes)."""
    return await asyncio.wait_for(raw.reader.readline(), 10)


async def test_replies_that_echo_the_client_stay_ascii_and_within_512_octets(
        tmp_path, sink, make_node):
    """Refusals that quote what the client sent went back as long as it was: a 600-octet
    unknown MAIL parameter in a 555 of 660 octets, an unknown 505-octet command in a 500 of
    545, and an unknown class header of any length; a class named in UTF-8 came back in UTF-8
    to a client that never said SMTPUTF8 (aiosmtplib refuses such a reply as not ASCII)."""
    node = await make_node(config_text(tmp_path, sink.port))
    raw = await session(node.listeners[0].port)
    raw.send(b"MAIL FROM:<s@insurer.test> X" + b"A" * 600 + b"\r\n")
    first = await _raw_reply(raw)
    raw.send(b"Y" * 505 + b"\r\n")
    second = await _raw_reply(raw)
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<a@example.com>")).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")
    raw.send(message(extra="X-Postlane-Class: n\u00e9e" + "q" * 900 + "\r\n") + b".\r\n")
    third = await _raw_reply(raw)
    for reply, code in ((first, b"555 5.5.4 XAAA"), (second, b"500 5.5.1"),
                        (third, b"550 5.7.1 unknown traffic class")):
        assert reply.startswith(code) and reply.endswith(b"\r\n"), reply[:80]
        assert len(reply) <= 512 and reply.isascii(), (len(reply), reply[:80])
    assert (await raw.cmd("NOOP")).startswith("250"), "the session goes on"
    await raw.close()


# -- a session waiting for its next command is told 421 when the node stops (RFC 5321 3.8) ----

async def test_a_session_waiting_for_a_command_gets_421_when_the_node_stops(tmp_path, sink,
                                                                          make_node):
    """SIGTERM stopped the listeners and answered 421 only to a further command: a client
    holding its connection open between messages (a pooled nodemailer, an Exim with
    ``smtp_accept_max_per_connection``) got no reply at all, the connection cut when the
    process ended (``postlane serve`` with nothing in flight ends in under a second)."""
    node = await make_node(config_text(tmp_path, sink.port))
    idle = await session(node.listeners[0].port)
    assert (await idle.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    await node.stop()
    assert (await idle.reply()).startswith("421 4.3.2")
    assert await idle.closed()


async def test_a_message_being_sent_at_sigterm_is_taken(tmp_path, sink, make_node):
    """SIGTERM while a client is inside DATA: the drain waits (up to ``drain_timeout``) for the
    transfer to end, answers it 250 and delivers it at the next start. The node went on to stop
    its signer and close its spool under it: the message got 451 (DKIM signing unavailable)
    or an error, and had to be sent again."""
    text = config_text(tmp_path, sink.port)
    node = await make_node(text)
    raw = await session(node.listeners[0].port)
    assert (await raw.cmd("MAIL FROM:<s@insurer.test>")).startswith("250")
    assert (await raw.cmd("RCPT TO:<late@example.com>")).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")
    data = message("sent across the stop", cls="policy-documents")
    raw.send(data[:20])
    stopping = asyncio.create_task(node.stop())
    await asyncio.wait({stopping}, timeout=2)  # the old node was stopped by then
    assert not stopping.done(), "the node stopped with a message half received"
    raw.send(data[20:] + b".\r\n")
    assert (await raw.reply()).startswith("250")
    assert (await raw.reply()).startswith("421 4.3.2")  # then idle: told and closed
    await stopping
    await make_node(text)
    await until(lambda: any(b"sent across the stop" in a.data for a in sink.arrivals),
                what="the message delivered after the restart")
