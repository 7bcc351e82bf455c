"""End to end through the real doors: SMTP in, spool on disk, SMTP out to a loopback sink."""

from __future__ import annotations

import asyncio
import email
import smtplib

import pytest

from tests.conftest import config_text, message, records, send


async def test_message_goes_out_from_its_pool_ip_with_its_ehlo(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    port = node.listeners[0].port
    await send(port, "sender@insurer.test", ["a@example.com"],
               message("notice", cls="policy-documents",
                       extra="X-Correlation-ID: policy-4711\r\n"))
    [arrival] = await sink.wait_for(1)
    assert arrival.peer == "127.0.0.20"
    assert arrival.ehlo == "tx0.test"
    assert arrival.mail_from == "sender@insurer.test"
    assert arrival.rcpts == ["a@example.com"]
    parsed = email.message_from_bytes(arrival.data)
    assert parsed["Subject"] == "notice"
    assert parsed["X-Postlane-Class"] is None, "the class header is removed before delivery"
    assert parsed["X-Postlane-Queued"]
    assert parsed["Message-ID"]
    await node.stop()
    rows = records(tmp_path)
    assert [r["type"] for r in rows] == ["r", "d"]
    assert rows[1]["header_X-Correlation-ID"] == "policy-4711"
    assert rows[1]["dlvSourceIp"] == "127.0.0.20"
    assert rows[1]["dlvDestinationIp"] == "127.0.0.1"
    assert rows[1]["vmtaPool"] == "critical"
    assert float(rows[1]["totalSecondsQueued"]) >= 0



async def test_250_450_550_give_delivered_retried_and_bounced(tmp_path, sink, make_node):
    sink.rcpt_replies = {"soft@example.com": ["450 4.2.1 mailbox busy", "250 2.1.5 ok"],
                         "hard@example.com": ["550 5.1.1 no such user"]}
    node = await make_node(config_text(tmp_path, sink.port))
    await send(node.listeners[0].port, "sender@example.com",
               ["ok@example.com", "soft@example.com", "hard@example.com"],
               message("three", cls="policy-documents"))
    # ok now; soft after its retry (1 s); the bounce to sender@example.com also lands in the sink
    arrivals = await sink.wait_for(3, timeout=20)
    await node.stop()
    by_rcpt = {tuple(a.rcpts): a for a in arrivals}
    assert ("ok@example.com",) in by_rcpt
    assert ("soft@example.com",) in by_rcpt
    bounce = by_rcpt[("sender@example.com",)]
    assert bounce.mail_from in ("", "<>")  # null sender
    report = email.message_from_bytes(bounce.data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = report.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    text = status.as_string()
    assert "hard@example.com" in text and "5.1.1" in text
    rows = [r for r in records(tmp_path) if r["rcpt"] != "sender@example.com"]
    kinds = {(r["rcpt"], r["type"]) for r in rows}
    assert ("ok@example.com", "d") in kinds
    assert ("soft@example.com", "t") in kinds and ("soft@example.com", "d") in kinds
    assert ("hard@example.com", "b") in kinds
    hard = next(r for r in rows if r["rcpt"] == "hard@example.com" and r["type"] == "b")
    assert hard["dsnStatus"] == "5.1.1" and "no such user" in hard["dsnDiag"]


async def test_oversize_gets_552_and_malformed_address_501(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    port = node.listeners[0].port
    with pytest.raises(smtplib.SMTPSenderRefused) as err:
        await send(port, "s@example.com", ["a@example.com"], b"x" * 200_000)
    assert err.value.smtp_code == 552
    with pytest.raises(smtplib.SMTPRecipientsRefused) as err2:
        await send(port, "s@example.com", ["bad address@@example.com"], message())
    code, _ = err2.value.recipients["bad address@@example.com"]
    assert code == 501


async def test_unknown_class_is_refused_not_demoted(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(node.listeners[0].port, "s@example.com", ["a@example.com"],
                   message(cls="no-such-class"))
    assert err.value.smtp_code == 550
    assert b"no-such-class" in err.value.smtp_error


async def test_stop_twice_waits_for_the_first_drain(tmp_path, sink, make_node):
    node = await make_node(config_text(tmp_path, sink.port))
    await asyncio.wait_for(asyncio.gather(node.stop(), node.stop()), 30)
    assert node.stopped.is_set()
