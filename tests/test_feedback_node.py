"""The feedback loop in a running node: scoped suppression at intake, VERP round trip with
asynchronous bounces, synchronous bounce categories, FBL complaints and complaint rates."""

from __future__ import annotations

import asyncio
import email
import json
import logging
import re
import smtplib
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from postlane.feedback.dsn import FailedRecipient, build_bounce
from tests.conftest import OPERATOR, config_text, message, records, send
from tests.support.waiting import until
from tests.test_cli_ops import run_cli
from tests.test_evidence import cli as evidence_cli

DATA = Path(__file__).parent / "data" / "feedback"

QMAIL_BOUNCE = """Return-Path: <>\r
Date: 24 Apr 2013 00:00:00 +0900\r
From: MAILER-DAEMON@mx4.example.jp\r
To: {to}\r
Subject: failure notice\r
\r
Hi. This is the qmail-send program at mx4.example.jp.\r
I'm afraid I wasn't able to deliver your message to the following addresses.\r
This is a permanent error; I've given up. Sorry it didn't work out.\r
\r
<kijitora@example.ne.jp>:\r
Sorry, no SMTP connection got far enough; most progress was RCPT TO response; remote host\r
 192.0.2.32 said: 550 Unknown user kijitora@example.ne.jp\r
. (#5.5.0)\r
\r
--- Below this line is a copy of the message.\r
\r
Return-Path: <nekochan@example.jp>\r
From: Nyanko <nekochan@example.jp>\r
To: kuroneko@example.com\r
Subject: Message\r
\r
neko\r
"""
"""A qmail prose bounce (the layout of qmail-send's), whose text names another address too."""

FEEDBACK = """
[feedback]
fbl_addresses = ["fbl@mta.test"]
complaint_min_delivered = 1
unsubscribe_url = "https://mta.test/unsubscribe"
[feedback.classes.marketing]
marketing = true
"""


def _config(tmp_path, port: int, extra: str = FEEDBACK, verp: bool = True) -> str:
    text = config_text(tmp_path, port, extra)
    if verp:
        text = text.replace("[pools.bulk]\n", '[pools.bulk]\nbounce_domain = "bounces.mta.test"\n')
    return text



async def test_scoped_suppression_refuses_drops_and_still_delivers_policy_notices(
        tmp_path, sink, make_node):
    node = await make_node(_config(tmp_path, sink.port, verp=False))
    node.feedback.suppression.add("news@example.com", "marketing", "unsubscribed", "unsubscribe")
    node.feedback.suppression.add("gone@example.com", "all", "5.1.1 user unknown", "bounce")
    port = node.listeners[0].port
    # scope "all" is known at RCPT: refused with the reason
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await send(port, "sender@insurer.test", ["gone@example.com"], message("x"))
    code, text = refused.value.recipients["gone@example.com"]
    assert code == 550 and re.fullmatch(rb"5\.7\.1 Recipient suppressed \(all, bounce, since "
                                        rb"\d{4}-\d\d-\d\d \d\d:\d\d UTC\): 5\.1\.1 user unknown",
                                        text.replace(b"\n", b" ")), text
    # scope "marketing" needs the class (known after DATA): accepted, then dropped
    await send(port, "sender@insurer.test", ["news@example.com", "ok@example.com"],
               message("newsletter", cls="marketing"))
    # a regulatory notice still reaches the customer who unsubscribed from marketing
    await send(port, "sender@insurer.test", ["news@example.com"],
               message("your policy", cls="policy-documents"))
    arrivals = await sink.wait_for(2)
    await node.stop()
    got = sorted((a.rcpts[0], email.message_from_bytes(a.data)["Subject"]) for a in arrivals)
    assert got == [("news@example.com", "your policy"), ("ok@example.com", "newsletter")]
    [s] = [r for r in records(tmp_path) if r["type"] == "s"]
    assert s["rcpt"] == "news@example.com" and s["class"] == "marketing"
    assert re.fullmatch(r"suppressed \(marketing, unsubscribe, since [-0-9]+ [0-9:]+ UTC\):"
                        r" unsubscribed", s["dsnDiag"]), s["dsnDiag"]


async def test_a_campaign_queued_before_an_unsubscribe_is_not_sent_to_it(tmp_path, sink,
                                                                         make_node):
    """The case study's campaign waits behind a paused pool; a recipient unsubscribes (or
    complains) meanwhile: when the pool resumes, that recipient is not sent the campaign (an
    "s" record, as at intake, and no DSN: an unsubscribe is not a failure), the others are."""
    node = await make_node(_config(tmp_path, sink.port, verp=False))
    await node.operations.pause("bulk", who=OPERATOR)
    await send(node.listeners[0].port, "news@example.com",
               ["stay@example.com", "leave@example.com"], message("campaign", cls="marketing"))
    node.feedback.suppression.add("leave@example.com", "marketing", "unsubscribed",
                                  "unsubscribe")
    await node.operations.resume("bulk", who=OPERATOR)
    [arrival] = await sink.wait_for(1)
    assert arrival.rcpts == ["stay@example.com"]
    await until(lambda: any(r["type"] == "s" for r in records(tmp_path)), timeout=10,
                what="the s record")
    await node.stop()
    rows = records(tmp_path)
    [s] = [r for r in rows if r["type"] == "s"]
    assert s["rcpt"] == "leave@example.com" and s["class"] == "marketing"
    assert re.fullmatch(r"suppressed \(marketing, unsubscribe, since [-0-9]+ [0-9:]+ UTC\):"
                        r" unsubscribed", s["dsnDiag"]), s["dsnDiag"]
    assert [r["rcpt"] for r in rows if r["type"] == "d"] == ["stay@example.com"]
    assert len(sink.arrivals) == 1, "no DSN for a marketing suppression"
    # the "s" is that recipient's final record: the trail is complete and says so (verify
    # called the recipient INCOMPLETE, and show said "queued", for ever)
    cfg = tmp_path / "node.toml"
    cfg.write_text(_config(tmp_path, sink.port, verp=False))
    res = evidence_cli("verify", "-c", str(cfg))
    assert res.exit_code == 0 and "INCOMPLETE" not in res.output, res.output
    res = evidence_cli("show", "-c", str(cfg), "--recipient", "leave@example.com")
    assert "outcome: suppressed" in res.output, res.output


async def test_a_notice_deferred_then_suppressed_is_not_sent_and_its_sender_is_told(
        tmp_path, sink, make_node):
    """A transactional message waits for its retry; an operator suppresses its recipient for
    every class meanwhile, with the CLI (another process writing the list's file): the retry
    sends nothing, the trail says why, and the sender gets a DSN - it was told 250."""
    # the destination defers every try: the suppression may come after any number of them
    # (a 451 then a 250 with a 4 s retry gave the CLI 4 s to run, and a CLI 4.5 s slower to
    # start, as on a loaded machine, let the retry deliver the message)
    sink.rcpt_replies = {"x@example.com": ["451 4.3.0 try later"]}
    text = _config(tmp_path, sink.port, verp=False).replace(
        'retry = ["1s", "1s", "2s"]', 'retry = ["1s"]')
    node = await make_node(text)
    await send(node.listeners[0].port, "app@example.com", ["x@example.com"],
               message("your policy", cls="policy-documents"))
    await until(lambda: any(r["type"] == "t" for r in records(tmp_path)), timeout=10,
                what="the deferral")
    code, out, err = await run_cli("suppress", "add", "x@example.com", "--scope", "all",
                                   "--reason", "customer deceased", "--db",
                                   str(tmp_path / "spool" / "suppression.sqlite3"))
    assert code == 0, err
    [dsn] = await sink.wait_for(1, timeout=30)
    assert dsn.rcpts == ["app@example.com"] and dsn.mail_from in ("", "<>")
    report = email.message_from_bytes(dsn.data)
    assert "customer deceased" in dsn.data.decode(errors="replace")
    assert report.get_content_type() == "multipart/report"
    await node.stop()
    rows = records(tmp_path)
    trail = [r["type"] for r in rows if r["rcpt"] == "x@example.com"]
    assert trail[:2] == ["r", "t"] and set(trail[2:-1]) <= {"t"} and trail[-1] == "s", trail
    # the try after the suppression sent nothing: the destination saw only the deferred ones
    assert sink.rcpt_attempts["x@example.com"] == trail.count("t")
    [s] = [r for r in rows if r["type"] == "s"]
    assert s["dsnStatus"] == "5.7.1" and "(all, operator, since" in s["dsnDiag"]


async def test_mail_queued_before_a_restart_is_screened_against_the_list_as_it_is_now(
        tmp_path, sink, make_node):
    """Entries written while the node was down (an import of unsubscribes) stop the mail it
    had queued: what was queued before the start is looked up again at delivery."""
    text = _config(tmp_path, sink.port, verp=False)
    node = await make_node(text)
    await node.operations.pause("bulk", who=OPERATOR)
    await send(node.listeners[0].port, "news@example.com", ["a@example.com", "b@example.com"],
               message("campaign", cls="marketing"))
    await node.stop()
    code, _, err = await run_cli("suppress", "add", "b@example.com", "--db",
                                 str(tmp_path / "spool" / "suppression.sqlite3"))
    assert code == 0, err
    node2 = await make_node(text)
    await node2.operations.resume("bulk", who=OPERATOR)
    [arrival] = await sink.wait_for(1)
    assert arrival.rcpts == ["a@example.com"]
    await until(lambda: any(r["type"] == "s" for r in records(tmp_path)), timeout=10,
                what="the s record")
    await node2.stop()
    assert [r["rcpt"] for r in records(tmp_path) if r["type"] == "s"] == ["b@example.com"]


async def test_drop_policy_accepts_at_rcpt_and_drops_at_data(tmp_path, sink, make_node):
    """A class that drops suppressed recipients takes them at RCPT; the look-up made there
    decides at DATA: the suppressed one gets an "s" record, the other is delivered."""
    extra = FEEDBACK + 'suppressed = "drop"\n'
    node = await make_node(_config(tmp_path, sink.port, extra, verp=False))
    node.feedback.suppression.add("gone@example.com", "all", "5.1.1 user unknown", "bounce")
    await send(node.listeners[0].port, "sender@insurer.test",
               ["gone@example.com", "ok@example.com"], message("newsletter", cls="marketing"))
    [arrival] = await sink.wait_for(1)
    await node.stop()
    assert arrival.rcpts == ["ok@example.com"]
    [s] = [r for r in records(tmp_path) if r["type"] == "s"]
    assert s["rcpt"] == "gone@example.com"
    assert re.fullmatch(r"suppressed \(all, bounce, since [-0-9]+ [0-9:]+ UTC\): 5.1.1 user"
                        r" unknown", s["dsnDiag"]), s["dsnDiag"]


async def test_verp_round_trip_remote_bounces_become_rb_records_and_suppressions(
        tmp_path, sink, make_node):
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    await send(port, "news@insurer.test", ["v1@example.com", "v2@example.com"],
               message("campaign", cls="marketing"))
    arrivals = await sink.wait_for(2)
    # one recipient per transaction, each with its own signed return path
    senders = {a.rcpts[0]: a.mail_from for a in arrivals}
    assert all(len(a.rcpts) == 1 for a in arrivals)
    for rcpt, sender in senders.items():
        assert sender.endswith("@bounces.mta.test")
        assert node.feedback.verp.decode(sender).recipient == rcpt
    forged = senders["v1@example.com"].replace("v1@", "v9@").replace("=example.com", "=ex.com")
    assert node.feedback.verp.decode(forged) is None
    # the remote side bounces later, to the VERP address: a standard DSN for v1 ...
    original = arrivals[0].data if arrivals[0].rcpts == ["v1@example.com"] else arrivals[1].data
    dsn = build_bounce(reporting_mta="mx.example.com", sender=senders["v1@example.com"],
                       recipients=[FailedRecipient("v1@example.com", "failed", "5.1.1",
                                                   "550 5.1.1 <v1@example.com>: no such user",
                                                   "mx.example.com")],
                       original=original, arrival_date=time.time(), ret="HDRS")
    await send(port, "", [senders["v1@example.com"]], dsn)
    # ... and a qmail-style prose bounce for v2 that names some other address in its text
    qmail = QMAIL_BOUNCE.replace("{to}", senders["v2@example.com"]).encode()
    await send(port, "", [senders["v2@example.com"]], qmail)
    # a forged DSN (no valid VERP) naming a customer suppresses nobody
    forged_dsn = dsn.replace(senders["v1@example.com"].encode(), forged.encode()).replace(
        b"v1@example.com", b"customer@example.com")
    assert await send(port, "", [forged], forged_dsn) == {}
    # the bounces were parsed, not relayed; one hard bounce each suppresses the addresses for
    # classes without an SLA (every class needs repeated evidence: see test_suppression_policy)
    hits = node.feedback.suppression.check(["v1@example.com", "v2@example.com"])
    assert {a: e.scope for a, e in hits.items()} == {"v1@example.com": "best-effort",
                                                     "v2@example.com": "best-effort"}
    assert not node.feedback.suppression.check(["customer@example.com"])
    await node.stop()
    assert len(sink.arrivals) == 2
    rb = {r["rcpt"]: r for r in records(tmp_path) if r["type"] == "rb"}
    assert set(rb) == {"v1@example.com", "v2@example.com"}
    assert rb["v1@example.com"]["dsnStatus"] == "5.1.1"
    assert rb["v1@example.com"]["bounceCat"] == "bad-mailbox"
    assert rb["v1@example.com"]["vmtaPool"] == "bulk"
    qids = {r["queueId"] for r in records(tmp_path) if r["type"] == "d"}
    assert rb["v1@example.com"]["queueId"] in qids
    assert rb["v2@example.com"]["bounceCat"] == "bad-mailbox"


async def test_a_remote_bounce_sent_again_after_a_restart_is_recorded_once(tmp_path, sink,
                                                                           make_node):
    """A node remembered the reports it recorded since its start only: the same bounce sent
    again after a restart (the reporting MTA never saw the 250) was a second "rb". It is
    looked for in the spool's outbox and the audit store now: one "rb"; and when it is still
    in the outbox only (the recorder not yet past it), it is found there too."""
    text = _config(tmp_path, sink.port)
    node = await make_node(text)
    await send(node.listeners[0].port, "news@insurer.test", ["v1@example.com"],
               message("campaign", cls="marketing"))
    [arrival] = await sink.wait_for(1)
    dsn = build_bounce(reporting_mta="mx.example.com", sender=arrival.mail_from,
                       recipients=[FailedRecipient("v1@example.com", "failed", "5.1.1",
                                                   "550 5.1.1 no such user", "mx.example.com")],
                       original=arrival.data, arrival_date=time.time(), ret="HDRS")
    await send(node.listeners[0].port, "", [arrival.mail_from], dsn)
    qid = node.feedback.verp.decode(arrival.mail_from).queue_id
    assert ("v1@example.com", "failed") in await node._reported(qid)
    await node.stop()
    node = await make_node(text)
    assert await send(node.listeners[0].port, "", [arrival.mail_from], dsn) == {}
    await node.stop()
    assert [r["rcpt"] for r in records(tmp_path) if r["type"] == "rb"] == ["v1@example.com"]


async def test_a_success_dsn_back_at_the_verp_address_is_an_rd_record_in_the_evidence(
        tmp_path, sink, make_node, caplog):
    """NOTIFY=SUCCESS is passed on; the receiving side's success DSN (Postfix's, as it sent
    one to a VERP address) comes back to the bounce domain and was "report ignored": the
    proof of delivery to the mailbox was dropped. It is an "rd" record now, and the evidence
    says so; a report to a forged VERP address proves nothing."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(_config(tmp_path, sink.port))
    node = await make_node(cfg.read_text())
    port = node.listeners[0].port
    await send(port, "news@insurer.test", ["v1@example.com"], message("campaign", cls="marketing"))
    [arrival] = await sink.wait_for(1)
    verp = arrival.mail_from
    template = (DATA / "postfix-success-dsn.eml").read_text()
    report = template.replace("{verp}", verp).replace("{rcpt}", "v1@example.com")
    await send(port, "", [verp], report.replace("\n", "\r\n").encode())
    forged = verp.replace("v1=example.com", "v9=example.com")
    with caplog.at_level(logging.WARNING, logger="postlane.feedback"):
        await send(port, "", [forged], template.replace("{verp}", forged).replace(
            "{rcpt}", "v9@example.com").replace("\n", "\r\n").encode())
    assert "delivery report without a valid VERP address ignored" in caplog.text
    await node.stop()
    [rd] = [r for r in records(tmp_path) if r["type"] == "rd"]
    [d] = [r for r in records(tmp_path) if r["type"] == "d"]
    assert (rd["rcpt"], rd["queueId"], rd["dsnAction"], rd["dsnStatus"]) == (
        "v1@example.com", d["queueId"], "delivered", "2.0.0")
    assert rd["dsnDiag"] == "X-Postfix; delivery via local: delivered to mailbox"
    res = await asyncio.to_thread(evidence_cli, "show", "-c", str(cfg), "--queue-id",
                                  d["queueId"])
    assert res.exit_code == 0, res.output
    assert ("reports it delivered: X-Postfix; delivery via local: delivered to mailbox"
            "  [2.0.0]") in res.output
    assert "outcome: delivered, confirmed by the receiving side's delivery report" in res.output


@pytest.mark.parametrize("case", ["no DSN at the receiver", "DSN at the receiver",
                                  "DSN at the receiver, VERP pool", "NOTIFY=FAILURE"])
async def test_notify_success_gets_a_relayed_dsn_where_nobody_beyond_reports(
        tmp_path, sink, make_node, case):
    """RFC 3461 5.2.2: NOTIFY=SUCCESS relayed to a server without DSN gets a "relayed" DSN
    from this node (it got nothing: the parameter was dropped, the promise with it). A server
    with DSN is given NOTIFY and reports itself, to the sender; in a VERP pool its report
    comes back to this node (an "rd" record), so the sender gets the "relayed" DSN here too."""
    sink.dsn = case != "no DSN at the receiver"
    verp = case.endswith("VERP pool")
    text = _config(tmp_path, sink.port, verp=verp).replace(
        "[routes]\n", f'[routes]\n"insurer.test" = "127.0.0.1:{sink.port}"\n')
    node = await make_node(text)
    notify = "FAILURE" if case == "NOTIFY=FAILURE" else "SUCCESS,FAILURE"
    await send(node.listeners[0].port, "app@insurer.test", ["anna@example.com"],
               message("notice", cls="marketing" if verp else "policy-documents"),
               rcpt_options=[f"NOTIFY={notify}"])
    told = case not in ("DSN at the receiver", "NOTIFY=FAILURE")
    arrivals = await sink.wait_for(2 if told else 1)
    await node.flush_evidence()
    await node.stop()
    [mail] = sink.for_rcpt("anna@example.com")
    assert mail.notify == ({"anna@example.com": notify} if sink.dsn else {})
    dsns = [a for a in arrivals if a.rcpts == ["app@insurer.test"]]
    assert len(sink.arrivals) == (2 if told else 1)
    if not told:
        assert not dsns
        return
    [dsn] = dsns
    report = email.message_from_bytes(dsn.data)
    assert dsn.mail_from == "<>" and report["Subject"] == "Successful Mail Delivery Report"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "Action: relayed" in text and "Status: 2.0.0" in text
    assert "Final-Recipient: rfc822; anna@example.com" in text
    assert [r["type"] for r in records(tmp_path) if r["rcpt"] == "anna@example.com"] == [
        "r", "d"]


async def test_a_report_for_a_pool_sharing_its_bounce_domain_names_the_messages_pool(
        tmp_path, sink, make_node):
    """Pools may share a bounce domain (``postlane init`` gives the three transactional pools
    one): the report's records took the pool the domain was listed under last, and no class
    nor sender, so a policy notice's remote bounce counted against the marketing pool's
    bounce rate. The audit store's "r" record of the queue id names them now."""
    text = _config(tmp_path, sink.port).replace(
        "[pools.critical]\n", '[pools.critical]\nbounce_domain = "bounces.mta.test"\n')
    node = await make_node(text)
    port = node.listeners[0].port
    await send(port, "notices@insurer.test", ["p1@example.com"],
               message("notice", cls="policy-documents"))
    [arrival] = await sink.wait_for(1)
    assert arrival.mail_from.endswith("@bounces.mta.test")
    await node.flush_evidence()  # the "r" record is in the store before the report comes
    dsn = build_bounce(reporting_mta="mx.example.com", sender=arrival.mail_from,
                       recipients=[FailedRecipient("p1@example.com", "failed", "5.1.1",
                                                   "550 5.1.1 no such user", "mx.example.com")],
                       original=arrival.data, arrival_date=time.time(), ret="HDRS")
    await send(port, "", [arrival.mail_from], dsn)
    await node.stop()
    [rb] = [r for r in records(tmp_path) if r["type"] == "rb"]
    assert (rb["vmtaPool"], rb["class"], rb["orig"]) == (
        "critical", "policy-documents", "notices@insurer.test")


async def test_synchronous_bounce_gets_its_category_and_suppresses(tmp_path, sink, make_node):
    sink.rcpt_replies = {"hard@example.com": ["550 5.1.1 <hard@example.com>: user unknown"],
                         "full@example.com": ["452 4.2.2 mailbox full", "250 ok"]}
    node = await make_node(_config(tmp_path, sink.port, verp=False))
    await send(node.listeners[0].port, "sender@example.com",
               ["hard@example.com", "full@example.com"], message("x", cls="policy-documents"))
    await sink.wait_for(2, timeout=20)  # full@ after its retry, and the DSN to the sender
    await node.stop()
    rows = records(tmp_path)
    [b] = [r for r in rows if r["type"] == "b"]
    assert b["bounceCat"] == "bad-mailbox"
    [t] = [r for r in rows if r["type"] == "t"]
    assert t["bounceCat"] == "quota-issues"
    node2 = await make_node(_config(tmp_path, sink.port, verp=False))
    hits = node2.feedback.suppression.check(["hard@example.com", "full@example.com"])
    assert list(hits) == ["hard@example.com"] and hits["hard@example.com"].source == "bounce"
    assert hits["hard@example.com"].scope == "best-effort"

async def _campaign_delivered(tmp_path, sink, make_node) -> tuple:
    """A node, its one campaign message to c@example.com as it arrived, and its Message-ID,
    once the delivery is in the complaint rates: what a complaint is about."""
    node = await make_node(_config(tmp_path, sink.port))
    await send(node.listeners[0].port, "news@insurer.test", ["c@example.com"],
               message("campaign", cls="marketing"))
    [arrival] = await sink.wait_for(1)
    await until(node.feedback.rates.rates, what='the "d" record in the rates')
    return node, arrival, email.message_from_bytes(arrival.data)["Message-ID"]



def _arf(return_path: str = "", message_id: str = "<m1@insurer.test>",
         rcpts: Sequence[str] = ()) -> bytes:
    """An abuse report about the message ``message_id``: its Return-Path (our VERP) if given,
    and ``rcpts`` in Original-Rcpt-To fields."""
    fields = "".join(f"Original-Rcpt-To: {r}\r\n" for r in rcpts)
    path = f"Return-Path: <{return_path}>\r\n" if return_path else ""
    return (
        "From: fbl@isp.example\r\nTo: fbl@mta.test\r\nSubject: complaint\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n"
        "--b\r\nContent-Type: message/feedback-report\r\n\r\n"
        "Feedback-Type: abuse\r\nUser-Agent: ISP-FBL/1.0\r\nVersion: 1\r\n"
        f"Source-IP: 127.0.0.30\r\nArrival-Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n{fields}\r\n"
        "--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"{path}From: news@insurer.test\r\nTo: redacted\r\n"
        f"Message-ID: {message_id}\r\nSubject: campaign\r\n\r\n--b--\r\n").encode()


async def test_fbl_complaint_suppresses_for_marketing_and_raises_the_rate_alert(
        tmp_path, sink, make_node, caplog):
    node, arrival, mid = await _campaign_delivered(tmp_path, sink, make_node)
    port = node.listeners[0].port
    with caplog.at_level(logging.WARNING, logger="postlane.feedback"):
        # the provider redacted the recipient: the VERP return path identifies it
        assert await send(port, "", ["fbl@mta.test"], _arf(arrival.mail_from, mid)) == {}
    assert "complaint rate above threshold" in caplog.text
    rates = {(r["pool"], r["domain"]): r for r in node.feedback.rates.rates()}
    assert rates[("bulk", "example.com")]["complaints"] == 1
    assert rates[("bulk", "example.com")]["rate"] == 1.0 and rates[("bulk", "*")]["alert"]
    assert node.feedback.suppression.check(["c@example.com"])
    assert not node.feedback.suppression.check(["c@example.com"], ["all"])
    await node.stop()
    [f] = [r for r in records(tmp_path) if r["type"] == "f"]
    assert f["rcpt"] == "c@example.com" and f["dsnDiag"] == "arf;abuse"
    assert f["messageId"] == mid and f["vmtaPool"] == "bulk"


async def test_a_complaint_by_message_id_sent_again_after_a_restart_is_recorded_once(
        tmp_path, sink, make_node):
    """An FBL that strips the return path names our message by its Message-ID only. Such a
    complaint was told from a copy by the node's memory alone: sent again after a restart
    (the FBL never saw the 250) it was a second "f" record, a second complaint in the rate.
    Its message is found by the Message-ID now (in the outbox or the store, as a VERP
    complaint's), and the copy is looked for under its queue id: one "f"."""
    node, arrival, mid = await _campaign_delivered(tmp_path, sink, make_node)
    arf = _arf("", mid, ["c@example.com"])
    assert await send(node.listeners[0].port, "", ["fbl@mta.test"], arf) == {}
    await node.stop()
    node = await make_node(_config(tmp_path, sink.port))
    assert await send(node.listeners[0].port, "", ["fbl@mta.test"], arf) == {}
    await node.stop()
    f = [r for r in records(tmp_path) if r["type"] == "f"]
    assert [(r["rcpt"], r["dsnAction"], r["messageId"]) for r in f] == [
        ("c@example.com", "abuse", mid)], f
    [d] = [r for r in records(tmp_path) if r["type"] == "d"]
    assert f[0]["queueId"] == d["queueId"] and f[0]["vmtaPool"] == "bulk"


async def test_reports_are_accepted_from_anywhere_but_mail_is_not_relayed(
        tmp_path, sink, make_node):
    text = _config(tmp_path, sink.port).replace('relay_from = ["127.0.0.0/8"]', 'relay_from = []')
    node = await make_node(text)
    port = node.listeners[0].port
    assert await send(port, "", ["fbl@mta.test"], _arf("x@elsewhere.test", "<m@x>")) == {}
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await send(port, "a@b.test", ["someone@example.com"], message("x"))
    await node.stop()


async def test_a_report_with_long_lines_is_read_mail_with_them_is_not_relayed(
        tmp_path, sink, make_node):
    """GMX's and Amazon SES's bounces come with lines over 998 octets: refused with 500 5.5.2
    at the bounce and FBL addresses, the feedback was lost. Mail to be relayed still meets
    RFC 5321's limit."""
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    long_line = "X-Long: " + "y" * 1500 + "\r\n"
    report = _arf("x@elsewhere.test", "<m@x>").replace(
        b"\r\n\r\n", f"\r\n{long_line}\r\n".encode(), 1)
    assert await send(port, "", ["fbl@mta.test"], report) == {}
    with pytest.raises(smtplib.SMTPDataError) as err:
        await send(port, "a@insurer.test", ["someone@example.com"],
                   message("x", extra=long_line))
    assert err.value.smtp_code == 500
    with pytest.raises(smtplib.SMTPDataError):  # a report and mail to relay: relayed rules
        await send(port, "a@insurer.test", ["fbl@mta.test", "someone@example.com"],
                   message("x", extra=long_line))
    await node.stop()


async def test_an_operators_suppression_applies_to_the_next_delivery_at_once(tmp_path, sink,
                                                                              make_node):
    """The node looks for changes of the list once a second, but its own writes (the API's,
    a complaint's, a bounce's) are known the moment they are committed: a campaign resumed
    right after ``suppress`` is not sent to that address, however recently the node last
    looked."""
    node = await make_node(_config(tmp_path, sink.port, verp=False))
    port = node.listeners[0].port
    await node.operations.pause("bulk", who=OPERATOR)
    await send(port, "news@example.com", ["stay@example.com", "leave@example.com"],
               message("campaign", cls="marketing"))
    await send(port, "app@example.com", ["other@example.com"],
               message("your policy", cls="policy-documents"))
    await sink.wait_for(1)  # its delivery looked at the list just now
    await node.operations.suppress("leave@example.com", "marketing", "unsubscribed",
                                   who=OPERATOR)
    await node.operations.resume("bulk", who=OPERATOR)
    arrivals = await sink.wait_for(2)
    await until(lambda: any(r["type"] == "s" for r in records(tmp_path)), timeout=10,
                what="the s record")
    await node.stop()
    assert sorted(a.rcpts[0] for a in arrivals) == ["other@example.com", "stay@example.com"]
    assert [r["rcpt"] for r in records(tmp_path) if r["type"] == "s"] == ["leave@example.com"]


def _ses(kind: str, source: str, rcpt: str, *, bounce_type: str = "Permanent",
         status: str = "5.1.1", diag: str = "smtp; 550 5.1.1 user unknown",
         sub_type: str = "General", message_id: str = "<m1@insurer.test>") -> dict:
    """An Amazon SES notification (the ``Message`` of an SNS notification), shaped as the real
    ones in tests/data/feedback/amazonses-*.eml: ``source`` is the MAIL FROM SES got (our VERP
    address when the pool relays through SES)."""
    mail = {"timestamp": "2026-12-07T10:00:00.000Z", "source": source,
            "messageId": "0101019a-ses-id-000000", "destination": [rcpt],
            "headersTruncated": False,
            "headers": [{"name": "From", "value": "news@insurer.test"},
                        {"name": "To", "value": rcpt},
                        {"name": "Message-ID", "value": message_id}],
            "commonHeaders": {"from": ["news@insurer.test"], "to": [rcpt]}}
    if kind == "Complaint":
        return {"notificationType": "Complaint", "mail": mail, "complaint": {
            "complainedRecipients": [{"emailAddress": rcpt}], "userAgent": "Yahoo!-Mail",
            "complaintFeedbackType": "abuse", "timestamp": "2026-12-07T11:00:00.000Z",
            "feedbackId": "0101019a-fb"}}
    return {"notificationType": "Bounce", "mail": mail, "bounce": {
        "bounceType": bounce_type, "bounceSubType": sub_type,
        "bouncedRecipients": [{"emailAddress": rcpt, "action": "failed", "status": status,
                               "diagnosticCode": diag}],
        "timestamp": "2026-12-07T10:00:05.000Z", "feedbackId": "0101019a-fb",
        "reportingMTA": "dsn; a8-1.smtp-out.amazonses.com"}}


def _sns_mail(notification: dict) -> bytes:
    """The notification as SNS mails it to an e-mail-JSON subscription (the FBL address)."""
    envelope = {"Type": "Notification", "MessageId": "02f86d9b-eecf",
                "TopicArn": "arn:aws:sns:eu-west-1:123456789012:ses-feedback",
                "Message": json.dumps(notification), "Timestamp": "2026-12-07T10:00:06.000Z"}
    return ("From: AWS Notifications <no-reply@sns.amazonaws.com>\r\nTo: fbl@mta.test\r\n"
            "Subject: AWS Notification Message\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=UTF-8\r\n\r\n"
            + json.dumps(envelope, indent=2) + "\r\n").encode()


async def test_amazon_ses_json_notifications_are_bounces_and_complaints(tmp_path, sink,
                                                                        make_node):
    """SES reports in JSON (by mail from SNS, or POSTed by an SNS webhook): they were read by
    the prose fallback, which took an address from the JSON text and a status from its
    numbers (a complaint became a 5.0.0 hard bounce, a delivery notice a bounce of the
    sender) and, our VERP being only in the JSON's ``source``, acted on nobody. Read as JSON:
    Permanent is a hard bounce, Transient a soft one (on the record, never a suppression),
    Complaint a complaint, each for the recipient the VERP address proves."""
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    rcpts = ["hard@example.com", "soft@example.com", "comp@example.com"]
    await send(port, "news@insurer.test", rcpts, message("campaign", cls="marketing"))
    verp = {a.rcpts[0]: a.mail_from for a in await sink.wait_for(3)}
    assert await send(port, "no-reply@sns.amazonaws.com", ["fbl@mta.test"], _sns_mail(
        _ses("Bounce", verp["hard@example.com"], "hard@example.com"))) == {}
    assert await send(port, "no-reply@sns.amazonaws.com", ["fbl@mta.test"], _sns_mail(
        _ses("Bounce", verp["soft@example.com"], "soft@example.com", bounce_type="Transient",
             sub_type="MailboxFull", status="4.2.2",
             diag="smtp; 452 4.2.2 mailbox full"))) == {}
    token = (tmp_path / "api-token").read_text().strip()
    webhook = {"Type": "Notification", "MessageId": "9a1", "Message": json.dumps(
        _ses("Complaint", verp["comp@example.com"], "comp@example.com"))}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.api.port}/api/v1",
                                 headers={"Authorization": f"Bearer {token}"}) as api:
        r = await api.post("/feedback/reports", content=json.dumps(webhook))
    assert r.status_code == 200 and r.json()["kind"] == "complaint", r.text
    assert r.json()["method"] == "ses-json"
    hits = node.feedback.suppression.check(rcpts, ["all", "best-effort", "marketing"])
    assert {a: e.scope for a, e in hits.items()} == {"hard@example.com": "best-effort",
                                                     "comp@example.com": "marketing"}
    await node.stop()
    rb = {r["rcpt"]: r for r in records(tmp_path) if r["type"] == "rb"}
    assert set(rb) == {"hard@example.com", "soft@example.com"}
    assert (rb["hard@example.com"]["dsnStatus"], rb["hard@example.com"]["bounceCat"]) == (
        "5.1.1", "bad-mailbox")
    assert rb["soft@example.com"]["dsnStatus"] == "4.2.2"
    assert rb["soft@example.com"]["bounceCat"] == "quota-issues"
    [f] = [r for r in records(tmp_path) if r["type"] == "f"]
    assert f["rcpt"] == "comp@example.com" and f["dsnDiag"] == "arf;abuse"
    assert f["vmtaPool"] == "bulk"


async def test_real_amazon_ses_notifications_parse_as_json():
    """The real SES notifications of the corpus, through ``postlane feedback parse``."""
    code, out, err = await run_cli("feedback", "parse", *(str(DATA / f"amazonses-{n}.eml") for n in
                                   ("sns-bounce", "complaint", "delivery")))
    assert code == 0, err
    bounce, complaint, delivery = map(json.loads, out.splitlines())
    assert (bounce["kind"], bounce["method"]) == ("bounce", "ses-json")
    [r] = bounce["recipients"]
    assert (r["address"], r["status"], r["permanent"], r["category"]) == (
        "bounce@simulator.amazonses.com", "5.1.1", True, "bad-mailbox")
    assert bounce["original_return_path"] == "kijitora@neko.example.org"
    assert (complaint["kind"], complaint["complaint"]["feedback_type"]) == ("complaint", "abuse")
    assert [r["address"] for r in complaint["recipients"]] == [
        "complaint@simulator.amazonses.com"]
    assert delivery["kind"] == "delivered"
    assert [(r["address"], r["action"], r["status"]) for r in delivery["recipients"]] == [
        ("success@simulator.amazonses.com", "delivered", "2.6.0")]


async def test_hostile_ses_json_is_no_report_or_only_what_it_names(tmp_path):
    """Anyone can reach the FBL address: JSON nested 200,000 deep is no report (not a crash),
    values of the wrong type are skipped, not taken as text."""
    nested = tmp_path / "nested.json"
    nested.write_text('{"notificationType":"Bounce","x":' + "[" * 200_000 + "]" * 200_000 + "}")
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps({"notificationType": "Bounce", "mail": [1], "bounce": {
        "bounceType": 7, "bouncedRecipients": [1, "a@example.com", {"emailAddress": ["x"]},
                                               {"emailAddress": "ok@example.com",
                                                "status": 9}]}}))
    code, out, err = await run_cli("feedback", "parse", str(nested), str(typed))
    assert code == 0, err
    first, second = map(json.loads, out.splitlines())
    assert first["kind"] == "not-a-report"
    assert [(r["address"], r["status"], r["permanent"]) for r in second["recipients"]] == [
        ("ok@example.com", "4.0.0", False)]
