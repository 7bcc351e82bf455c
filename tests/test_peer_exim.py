"""Exim 4.96 as the receiving MX and as a client: what it sent back to the node's bounce domain
when the node relayed to it (checked by hand on Debian 12, docs/operations.md "Clients and
peers checked"). Its reports are kept under tests/data/feedback/ with the VERP address and the
recipient as ``{verp}`` and ``{rcpt}``, so CI needs no Exim."""

from __future__ import annotations

from pathlib import Path

from postlane.feedback.parse import parse_report
from tests.conftest import message, records, send
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

