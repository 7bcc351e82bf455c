"""Exim 4.96 (and OpenSMTPD 6.8) as the receiving MX and as a client: what they sent back to
the node's bounce domain when the node relayed to them (checked by hand on Debian 12,
docs/operations.md "Clients and peers checked"). Their reports are kept under
tests/data/feedback/ with the VERP address and the recipient as ``{verp}`` and ``{rcpt}``, so
CI needs neither."""

from __future__ import annotations

import asyncio
from pathlib import Path

from postlane.address import parse_path
from postlane.feedback.parse import parse_report
from postlane.feedback.verp import VERP, VerpAddress
from postlane.harness.sink import Sink
from tests.conftest import message, records, send
from tests.support.rawsmtp import session
from tests.test_evidence import cli as evidence_cli
from tests.test_feedback_node import _config

DATA = Path(__file__).parent / "data" / "feedback"


def _exim(name: str, verp: str, rcpt: str) -> bytes:
    text = (DATA / name).read_text().replace("{verp}", verp).replace("{rcpt}", rcpt)
    return text.replace("\n", "\r\n").encode()


def test_exim_local_failure_takes_the_reason_from_the_text() -> None:
    """Exim's DSN for a recipient that failed after it accepted the message (a router's
    ``:fail:``, an unknown local user, a full mailbox) says ``Status: 5.0.0`` and has no
    Diagnostic-Code: the reason is only in the human-readable part, indented under the
    address. It was a 5.0.0 "other" with an empty diagnostic."""
    report = parse_report(_exim("exim-local-failure.eml", "b.1.0.x.k=example.com@b.test",
                                "k@example.com"))
    [rcpt] = report.recipients
    assert (report.kind, rcpt.address, rcpt.status, rcpt.category, rcpt.diagnostic) == (
        "bounce", "k@example.com", "5.1.1", "bad-mailbox",
        "5.1.1 mailbox unavailable (bounceme)")


async def test_exim_local_failure_bounce_is_a_bad_mailbox_and_suppresses(
        tmp_path, sink, make_node):
    """The same report coming back to the VERP address: an ``rb`` record with the reason and
    the category of a bad mailbox, and the one-bounce suppression of classes without an SLA
    (it was category "other": no suppression, and Exim-hosted mailboxes that no longer exist
    were mailed again and again)."""
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    await send(port, "news@insurer.test", ["k@example.com"], message("x", cls="marketing"))
    [arrival] = await sink.wait_for(1)
    report = _exim("exim-local-failure.eml", arrival.mail_from, "k@example.com")
    assert await send(port, "", [arrival.mail_from], report) == {}
    hits = node.feedback.suppression.check(["k@example.com"])
    assert {a: (e.scope, e.source) for a, e in hits.items()} == {
        "k@example.com": ("best-effort", "bounce")}
    await node.stop()
    [rb] = [r for r in records(tmp_path) if r["type"] == "rb"]
    assert (rb["rcpt"], rb["dsnStatus"], rb["bounceCat"], rb["dsnDiag"]) == (
        "k@example.com", "5.1.1", "bad-mailbox", "5.1.1 mailbox unavailable (bounceme)")


def test_verp_of_a_non_ascii_recipient_is_ascii_and_decodes_to_the_recipient() -> None:
    """The VERP address of a UTF-8 recipient spelled it raw (``b.….jörg=example.com@…``), so
    every report about it had to come back with SMTPUTF8: Exim 4.96 sends its DSNs without
    it, and the inbound listener answered ``553 5.6.7``. It is ASCII now (the recipient in
    Punycode, ``u.…``), signed over the recipient as before; a ``b.`` address with UTF-8 (mail
    in flight across the upgrade) still decodes."""
    verp = VERP(b"k" * 32)
    for rcpt in ("jörg@example.com", "anna@exämple.org", '"jö rg"@example.com',
                 "a=b@exämple.org"):
        address = verp.encode("1A24D49D063BBBA00002", 3, rcpt, "bounces.test")
        assert address.isascii() and address.endswith("@bounces.test"), address
        assert parse_path(f"<{address}>", utf8=False)[0] == address  # no SMTPUTF8 needed
        assert verp.decode(address) == VerpAddress("1A24D49D063BBBA00002", 3, rcpt)
        assert verp.decode(address.replace(".3.", ".4.")) is None  # signed
    ascii_one = verp.encode("1A24D49D063BBBA00002", 0, "k@example.com", "b.test")
    assert ascii_one.startswith("b.1A24D49D063BBBA00002.0.")  # unchanged for ASCII
    mac = verp._mac("1A24D49D063BBBA00002", 0, "jörg@example.com")
    assert verp.decode(f"b.1A24D49D063BBBA00002.0.{mac}.jörg=example.com@b.test") == \
        VerpAddress("1A24D49D063BBBA00002", 0, "jörg@example.com")


async def _raw_report(port: int, verp: str, report: bytes) -> list[str]:
    """A report sent as Exim sent it: ``MAIL FROM:<>`` without SMTPUTF8."""
    raw = await session(port)
    replies = [await raw.cmd("EHLO peer-mx.test"), await raw.cmd("MAIL FROM:<>"),
               await raw.cmd(f"RCPT TO:<{verp}>".encode() + b"\r\n")]
    if replies[-1].startswith("250"):
        replies.append(await raw.cmd("DATA"))
        raw.send(report + b".\r\n")
        replies.append(await raw.reply())
    await raw.close()
    return replies


async def test_exim_report_about_a_utf8_recipient_reaches_the_bounce_domain(
        tmp_path, sink, make_node):
    """A message to ``jörg@example.com`` relayed with SMTPUTF8 to Exim, which reported its
    delivery (NOTIFY=SUCCESS) to the VERP address without SMTPUTF8: refused with ``553 5.6.7``
    (Exim froze its DSN), so no ``rd`` record, and no ``rb`` record or suppression either
    for a failure. Now the VERP is ASCII and the report is taken."""
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    raw = await session(port)
    assert (await raw.cmd("MAIL FROM:<news@insurer.test> SMTPUTF8")).startswith("250")
    assert (await raw.cmd("RCPT TO:<jörg@example.com> NOTIFY=SUCCESS".encode() + b"\r\n")
            ).startswith("250")
    assert (await raw.cmd("DATA")).startswith("354")
    raw.send(message("x", cls="marketing") + b".\r\n")
    assert (await raw.reply()).startswith("250")
    await raw.close()
    [arrival] = await sink.wait_for(1)
    assert arrival.rcpts == ["jörg@example.com"] and arrival.mail_from.isascii()
    report = _exim("exim-utf8-success-dsn.eml", arrival.mail_from, "jörg@example.com")
    replies = await _raw_report(port, arrival.mail_from, report)
    assert [r[:3] for r in replies] == ["250", "250", "250", "354", "250"], replies
    await node.stop()
    [rd] = [r for r in records(tmp_path) if r["type"] == "rd"]
    assert (rd["rcpt"], rd["dsnAction"], rd["dsnDiag"]) == (
        "jörg@example.com", "delivered", "X-Exim; relayed via non SMTP router")


async def test_idn_recipient_in_a_verp_pool_goes_to_a_server_without_smtputf8(
        tmp_path, make_node):
    """``anna@exämple.org`` goes as ``anna@xn--exmple-cua.org`` to a server without SMTPUTF8
    (tests/test_smtputf8.py), but not from a pool with a bounce domain: its VERP return path
    spelled ``…anna=exämple.org@…``, which cannot be downgraded, and the message bounced
    ``553 5.6.7`` though the recipient could be reached."""
    target = await Sink(smtputf8=False).start()
    try:
        text = _config(tmp_path, target.port).replace(
            '"example.com"', '"xn--exmple-cua.org"')
        node = await make_node(text)
        await send(node.listeners[0].port, "news@insurer.test", ["anna@exämple.org"],
                   message("x", cls="marketing"), mail_options=["SMTPUTF8"])
        [arrival] = await target.wait_for(1)
        assert arrival.rcpts == ["anna@xn--exmple-cua.org"] and not arrival.smtputf8
        assert arrival.mail_from.isascii()
        await node.stop()
        assert [r["type"] for r in records(tmp_path) if r["type"] not in ("r", "o")] == ["d"]
    finally:
        await target.stop()


async def test_exim_delay_warning_is_an_rd_record_not_a_confirmation(tmp_path, sink, make_node):
    """Exim's delay warning (NOTIFY=DELAY, ``delay_warning``) to the VERP address was taken
    with 250 and dropped without a word: the trail said "delivered" while the receiving side
    still held the message. It is an ``rd`` record with dsnAction ``delayed`` now: on the
    trail as the receiving side's report, never a confirmation of delivery, no suppression."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(_config(tmp_path, sink.port))
    node = await make_node(cfg.read_text())
    port = node.listeners[0].port
    await send(port, "news@insurer.test", ["k@example.com"], message("x", cls="marketing"),
               rcpt_options=["NOTIFY=DELAY,FAILURE"])
    [arrival] = await sink.wait_for(1)
    report = _exim("exim-delay-warning.eml", arrival.mail_from, "k@example.com")
    assert await send(port, "", [arrival.mail_from], report) == {}
    assert not node.feedback.suppression.check(["k@example.com"])
    await node.stop()
    [rd] = [r for r in records(tmp_path) if r["type"] == "rd"]
    [d] = [r for r in records(tmp_path) if r["type"] == "d"]
    assert (rd["rcpt"], rd["queueId"], rd["dsnAction"], rd["dsnStatus"], rd["bounceCat"]) == (
        "k@example.com", d["queueId"], "delayed", "4.0.0", "")
    res = await asyncio.to_thread(evidence_cli, "show", "-c", str(cfg), "--queue-id",
                                  d["queueId"])
    assert res.exit_code == 0, res.output
    assert "the receiving side (127.0.0.1) reports it delayed" in res.output, res.output
    assert "outcome: delivered;" in res.output and "confirmed" not in res.output


async def test_opensmtpd_expiry_reported_as_delayed_is_a_failure(tmp_path, sink, make_node):
    """OpenSMTPD 6.8 reports an envelope it removed at its queue ttl as ``Action: delayed``,
    ``Status: 4.4.7`` ("Envelope expired"; its text still says the message is kept in the
    queue). The message is lost: an ``rb`` record (failed, 4.4.7, message-expired) like the
    node's own expiry, never a suppression; not a delay report beside "delivered"."""
    real = _exim("opensmtpd-expired-dsn.eml", "b.1.0.x.k=example.com@b.test", "k@example.com")
    [rcpt] = parse_report(real).recipients
    assert (rcpt.action, rcpt.status, rcpt.category, rcpt.diagnostic) == (
        "failed", "4.4.7", "message-expired", "Envelope expired")
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    await send(port, "news@insurer.test", ["k@example.com"], message("x", cls="marketing"))
    [arrival] = await sink.wait_for(1)
    report = _exim("opensmtpd-expired-dsn.eml", arrival.mail_from, "k@example.com")
    assert await send(port, "", [arrival.mail_from], report) == {}
    assert not node.feedback.suppression.check(["k@example.com"])
    await node.stop()
    assert not [r for r in records(tmp_path) if r["type"] == "rd"]
    [rb] = [r for r in records(tmp_path) if r["type"] == "rb"]
    assert (rb["rcpt"], rb["dsnAction"], rb["dsnStatus"], rb["bounceCat"]) == (
        "k@example.com", "failed", "4.4.7", "message-expired")
