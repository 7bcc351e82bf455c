"""Reports whose parts are encoded or in the RFC 6533 form: base64 message/delivery-status
(Exchange and others send it despite RFC 2046), message/global-delivery-status with UTF-8
addresses, base64 ARF parts, and Postlane's own DSN for a non-ASCII recipient read back."""

from __future__ import annotations

import base64
import email
from pathlib import Path

from postlane.feedback.dsn import FailedRecipient, build_bounce
from postlane.feedback.parse import parse_report
from tests.conftest import message, records, send
from tests.test_feedback_node import _config

DATA = Path(__file__).parent / "data" / "feedback"
STATUS = (b"Reporting-MTA: dns; mx.example.net\r\n\r\n"
          b"Final-Recipient: rfc822; bob@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\n"
          b"Diagnostic-Code: smtp; 550 5.1.1 <bob@example.net>: no such user\r\n")


def _report(kind: bytes, part: bytes, original: bytes, *, to: str = "x@bounces.example",
            encode: bool = True, ctype: bytes = b"message/delivery-status") -> bytes:
    """A multipart/report whose second part (and the returned message) are base64."""
    cte = b"Content-Transfer-Encoding: base64\r\n" if encode else b""
    body = base64.encodebytes(part) if encode else part
    return (b"From: MAILER-DAEMON@mx.example.net\r\nTo: " + to.encode() +
            b"\r\nSubject: Undeliverable: hi\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/report; report-type=" + kind + b"; boundary=B\r\n\r\n"
            b"--B\r\nContent-Type: text/plain\r\n\r\nSee the attached report.\r\n"
            b"--B\r\nContent-Type: " + ctype + b"\r\n" + cte +
            b"\r\n" + body + b"\r\n--B\r\nContent-Type: message/rfc822\r\n" + cte + b"\r\n" +
            (base64.encodebytes(original) if encode else original) + b"\r\n--B--\r\n")


ORIGINAL = (b"Return-Path: <v-1@bounces.example>\r\nFrom: news@bank.example\r\nTo: redacted\r\n"
            b"Message-ID: <m1@bank.example>\r\nSubject: hi\r\n\r\nbody\r\n")
ARF = (b"Feedback-Type: abuse\r\nUser-Agent: ISP-FBL/1.0\r\nVersion: 1\r\n"
       b"Source-IP: 192.0.2.7\r\n")


def test_base64_delivery_status_keeps_the_status_and_category() -> None:
    report = parse_report(_report(b"delivery-status", STATUS, ORIGINAL))
    assert report.method == "dsn"
    [r] = report.recipients
    assert (r.address, r.status, r.category) == ("bob@example.net", "5.1.1", "bad-mailbox")
    assert report.original_return_path == "v-1@bounces.example"


def test_global_delivery_status_with_a_utf8_recipient() -> None:
    status = STATUS.replace(b"rfc822; bob@example.net", "utf-8; jörg@exämple.net".encode())
    for encode in (False, True):
        report = parse_report(_report(b"global-delivery-status", status, ORIGINAL,
                                      encode=encode, ctype=b"message/global-delivery-status"))
        assert report.method == "dsn", encode
        [r] = report.recipients
        assert (r.address, r.status, r.category) == ("jörg@exämple.net", "5.1.1", "bad-mailbox")


def test_base64_arf_parts_keep_the_feedback_type_and_reported_return_path() -> None:
    report = parse_report(_report(b"feedback-report", ARF, ORIGINAL,
                                  ctype=b"message/feedback-report"))
    assert report.complaint is not None
    assert report.complaint.feedback_type == "abuse"
    assert report.complaint.source_ip == "192.0.2.7"
    assert report.original_return_path == "v-1@bounces.example"
    assert report.original_message_id == "<m1@bank.example>"


def test_own_dsn_for_a_non_ascii_recipient_is_read_back() -> None:
    dsn = build_bounce(reporting_mta="mta.postlane.example", sender="a@bank.example",
                       recipients=[FailedRecipient("jörg@exämple.net", "failed", "5.1.1",
                                                   "550 5.1.1 no such user", "mx.example.net")],
                       original=ORIGINAL, arrival_date=0)
    [r] = parse_report(dsn).recipients
    assert (r.address, r.status, r.category) == ("jörg@exämple.net", "5.1.1", "bad-mailbox")


async def test_encoded_bounce_and_complaint_over_smtp_suppress(tmp_path, sink, make_node):
    """Through the node: a base64 DSN to the VERP address suppresses the address (a 5.0.0
    "other" did not), a base64 ARF to the FBL address names the VERP recipient."""
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    await send(port, "news@insurer.test", ["v1@example.com", "v2@example.com"],
               message("campaign", cls="marketing"))
    arrivals = {a.rcpts[0]: a for a in await sink.wait_for(2)}
    v1, v2 = arrivals["v1@example.com"], arrivals["v2@example.com"]
    status = STATUS.replace(b"bob@example.net", b"v1@example.com")
    dsn = _report(b"delivery-status", status, v1.data, to=v1.mail_from)
    assert await send(port, "", [v1.mail_from], dsn) == {}
    original = f"Return-Path: <{v2.mail_from}>\r\n".encode() + v2.data
    assert await send(port, "", ["fbl@mta.test"], _report(
        b"feedback-report", ARF, original, to="fbl@mta.test",
        ctype=b"message/feedback-report")) == {}
    hits = node.feedback.suppression.check(["v1@example.com", "v2@example.com"])
    assert {a: (e.scope, e.source) for a, e in hits.items()} == {
        "v1@example.com": ("best-effort", "bounce"), "v2@example.com": ("marketing", "complaint")}
    await node.stop()
    [rb] = [r for r in records(tmp_path) if r["type"] == "rb"]
    assert (rb["rcpt"], rb["dsnStatus"], rb["bounceCat"]) == ("v1@example.com", "5.1.1",
                                                            "bad-mailbox")
    [f] = [r for r in records(tmp_path) if r["type"] == "f"]
    assert (f["rcpt"], f["dsnDiag"]) == ("v2@example.com", "arf;abuse")
    assert f["messageId"] == email.message_from_bytes(v2.data)["Message-ID"]


async def test_expired_prose_bounce_is_a_failure_not_a_delay(tmp_path, sink, make_node):
    """OpenSMTPD's "Envelope expired" (as qmail's and Sendmail's give-ups): the message is lost,
    so it is an "rb" record like the node's own expiry (failed, 4.4.7), not an ignored delay;
    a 4.x.x never suppresses."""
    real = (DATA / "opensmtpd-expired.eml").read_bytes()
    assert parse_report(real).kind == "bounce"
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    await send(port, "news@insurer.test", ["k@example.com"], message("x", cls="marketing"))
    [arrival] = await sink.wait_for(1)
    # the VERP names the recipient (the text names the corpus's own)
    assert await send(port, "", [arrival.mail_from], real.replace(b"\n", b"\r\n")) == {}
    assert not node.feedback.suppression.check(["k@example.com"])
    await node.stop()
    [rb] = [r for r in records(tmp_path) if r["type"] == "rb"]
    assert (rb["rcpt"], rb["dsnAction"], rb["dsnStatus"], rb["bounceCat"]) == (
        "k@example.com", "failed", "4.4.7", "message-expired")


async def test_microsoft365_no_such_user_suppresses(tmp_path, sink, make_node):
    """Microsoft 365 refuses a recipient its tenant does not have with "550 5.4.1 Recipient
    address rejected: Access denied" (Sisimai: userunknown): a bad mailbox, not "no answer
    from host", so one such bounce suppresses the address for classes without an SLA."""
    real = (DATA / "microsoft365-dbeb.eml").read_bytes()
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    await send(port, "news@insurer.test", ["k@example.com"], message("x", cls="marketing"))
    [arrival] = await sink.wait_for(1)
    assert await send(port, "", [arrival.mail_from], real.replace(b"\n", b"\r\n")) == {}
    hits = node.feedback.suppression.check(["k@example.com"])
    assert {a: (e.scope, e.source) for a, e in hits.items()} == {
        "k@example.com": ("best-effort", "bounce")}
    await node.stop()
    [rb] = [r for r in records(tmp_path) if r["type"] == "rb"]
    assert (rb["dsnStatus"], rb["bounceCat"]) == ("5.4.1", "bad-mailbox")


async def test_forwarded_arf_names_the_reported_recipient_not_our_fbl_address(
        tmp_path, sink, make_node):
    """An ARF report forwarded as message/rfc822 (an abuse desk passing it on): the reported
    message is the one beside the report part, not the first message/rfc822 found (the
    forwarded report, whose single To: is our FBL address, which was then suppressed)."""
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    await send(port, "news@insurer.test", ["c@example.com"], message("x", cls="marketing"))
    [arrival] = await sink.wait_for(1)
    original = f"Return-Path: <{arrival.mail_from}>\r\n".encode() + arrival.data.replace(
        b"To: someone@example.com", b"To: redacted@example.com")
    arf = _report(b"feedback-report", ARF, original, to="fbl@mta.test", encode=False,
                  ctype=b"message/feedback-report")
    forwarded = (b"From: abuse-desk@isp.example\r\nTo: fbl@mta.test\r\nSubject: Fwd: report\r\n"
                 b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=F\r\n\r\n"
                 b"--F\r\nContent-Type: text/plain\r\n\r\nFYI\r\n--F\r\n"
                 b"Content-Type: message/rfc822\r\n\r\n" + arf + b"\r\n--F--\r\n")
    assert await send(port, "", ["fbl@mta.test"], forwarded) == {}
    hits = node.feedback.suppression.check(["c@example.com", "fbl@mta.test"])
    assert {a: e.source for a, e in hits.items()} == {"c@example.com": "complaint"}
    await node.stop()
    [f] = [r for r in records(tmp_path) if r["type"] == "f"]
    assert (f["rcpt"], f["dsnDiag"]) == ("c@example.com", "arf;abuse")


def test_feedback_report_fields_sent_as_text_plain_are_read() -> None:
    """multipart/report; report-type=feedback-report with the fields labelled text/plain:
    a complaint (it was "not-a-report", logged and ignored)."""
    report = parse_report(_report(b"feedback-report", ARF, ORIGINAL, encode=False,
                                  ctype=b"text/plain"))
    assert report.kind == "complaint" and report.complaint is not None
    assert report.complaint.feedback_type == "abuse"
    assert report.original_return_path == "v-1@bounces.example"


async def test_quoted_local_part_gets_a_valid_verp_and_its_bounce_is_read(
        tmp_path, sink, make_node):
    """``"neko..nyaan"@example.com`` is a valid recipient; its VERP was ``b.…."neko..nyaan"=…``,
    which the next hop refused (553 5.1.3 malformed address): the message failed and that reply
    counted as the recipient's hard bounce. The VERP is now a quoted-string, and a DSN naming
    the quoted address is read and suppresses it."""
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    rcpt = '"neko..nyaan"@example.com'
    await send(port, "news@insurer.test", [rcpt], message("x", cls="marketing"))
    [arrival] = await sink.wait_for(1, timeout=10)
    assert arrival.rcpts == [rcpt] and arrival.mail_from.startswith('"b.')
    verp = node.feedback.verp.decode(arrival.mail_from)
    assert verp is not None and verp.recipient == rcpt
    dsn = build_bounce(reporting_mta="mx.example.com", sender=arrival.mail_from,
                       recipients=[FailedRecipient(rcpt, "failed", "5.1.1", "550 5.1.1 unknown")],
                       original=arrival.data, arrival_date=0)
    assert await send(port, "", [arrival.mail_from], dsn) == {}
    assert [r.address for r in parse_report(dsn).recipients] == [rcpt]
    assert node.feedback.suppression.check([rcpt])[rcpt].scope == "best-effort"
    await node.stop()
    [rb] = [r for r in records(tmp_path) if r["type"] == "rb"]
    assert (rb["rcpt"], rb["dsnStatus"]) == (rcpt, "5.1.1")
    assert not [r for r in records(tmp_path) if r["type"] == "b"]


async def test_complaint_for_a_non_ascii_address_names_that_address(
        tmp_path, sink, make_node):
    """Original-Rcpt-To: jörg@example.net (RFC 6531) suppressed "rg@example.net", someone
    else, because the address pattern was ASCII-only."""
    node = await make_node(_config(tmp_path, sink.port))
    arf = _report(b"feedback-report", ARF + "Original-Rcpt-To: jörg@example.net\r\n".encode(),
                  ORIGINAL, to="fbl@mta.test", encode=False, ctype=b"message/feedback-report")
    assert await send(node.listeners[0].port, "", ["fbl@mta.test"], arf) == {}
    hits = node.feedback.suppression.check(["jörg@example.net", "rg@example.net"])
    assert {a: e.source for a, e in hits.items()} == {"jörg@example.net": "complaint"}
    await node.stop()


def test_raw_utf8_final_recipient_in_a_plain_delivery_status() -> None:
    """An SMTPUTF8 MTA that writes raw UTF-8 into message/delivery-status (not the global
    type): the address is read whole, not as U+FFFD bytes or a cut-off ASCII tail."""
    status = STATUS.replace(b"rfc822; bob@example.net", "rfc822; jörg@example.net".encode())
    [r] = parse_report(_report(b"delivery-status", status, ORIGINAL, encode=False)).recipients
    assert (r.address, r.status) == ("jörg@example.net", "5.1.1")


def test_parts_labelled_base64_that_are_not_do_not_crash_the_parser() -> None:
    """Plain text under "Content-Transfer-Encoding: base64" is read as the email package parsed
    it (binascii raised, and a report address answered 451 for ever)."""
    for ctype in (b"message/delivery-status", b"message/global-delivery-status"):
        raw = _report(b"delivery-status", STATUS, ORIGINAL, encode=False, ctype=ctype)
        raw = raw.replace(b"Content-Type: " + ctype + b"\r\n", b"Content-Type: " + ctype +
                          b"\r\nContent-Transfer-Encoding: base64\r\n")
        raw = raw.replace(b"Content-Type: message/rfc822\r\n", b"Content-Type: message/rfc822"
                          b"\r\nContent-Transfer-Encoding: base64\r\n")
        [r] = parse_report(raw).recipients
        assert r.address == "bob@example.net"
