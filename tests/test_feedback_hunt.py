"""Hostile and repeated reports at the node's feedback addresses, through SMTP: an ARF naming
an address no list can hold, a DSN that names our recipient delayed and someone else failed,
and the same complaint sent again."""

from __future__ import annotations

import email
import time

from postlane.feedback.dsn import FailedRecipient, build_bounce
from tests.conftest import message, records, send
from tests.support.waiting import until
from tests.test_feedback_node import _arf, _campaign_delivered, _config


async def test_a_complaint_naming_an_impossible_address_is_read_not_answered_451(
        tmp_path, sink, make_node):
    # 262 octets: no suppression list entry can hold it (RFC 5321: 254 at most). The report
    # was answered 451 for ever (the FBL resends), its good recipient suppressed on every try
    # and never on the record
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    long = "x" * 250 + "@example.com"
    assert await send(port, "", ["fbl@mta.test"], _arf(rcpts=["ok@example.com", long])) == {}
    assert node.feedback.suppression.check(["ok@example.com"])
    await node.stop()
    assert [r["rcpt"] for r in records(tmp_path) if r["type"] == "f"] == ["ok@example.com"]

async def _campaign_to_a(tmp_path, sink, make_node, reported: list[FailedRecipient]):
    """A node that delivered one campaign message to a@example.com, and a coroutine function
    that sends the DSN reporting ``reported`` back to that message's VERP address."""
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    await send(port, "news@insurer.test", ["a@example.com"], message("campaign", cls="marketing"))
    [arrival] = await sink.wait_for(1)
    dsn = build_bounce(reporting_mta="mx.example.com", sender=arrival.mail_from,
                       recipients=reported, original=arrival.data, arrival_date=time.time(),
                       ret="HDRS")

    async def send_dsn() -> None:
        assert await send(port, "", [arrival.mail_from], dsn) == {}

    return node, send_dsn



async def test_a_dsn_naming_our_recipient_delayed_does_not_bounce_it_for_another(
        tmp_path, sink, make_node):
    # the DSN came back to a@'s VERP address and says a@ is delayed, some other address
    # failed: a@ was given the other one's 5.1.1 and suppressed
    node, send_dsn = await _campaign_to_a(tmp_path, sink, make_node, [
        FailedRecipient("a@example.com", "delayed", "4.2.2", "452 4.2.2 mailbox full",
                        "mx.example.com"),
        FailedRecipient("other@example.org", "failed", "5.1.1", "550 5.1.1 no such user",
                        "mx.example.org")])
    await send_dsn()
    assert not node.feedback.suppression.check(["a@example.com", "other@example.org"])
    await node.stop()
    reports = [(r["type"], r["rcpt"], r["dsnAction"], r["dsnStatus"]) for r in records(tmp_path)
               if r["type"] in ("rb", "rd")]
    assert reports == [("rd", "a@example.com", "delayed", "4.2.2")]


async def test_the_same_complaint_sent_again_counts_once(tmp_path, sink, make_node):
    # an FBL that did not see our 250 sends the report again: it was recorded and counted
    # once per copy (a complaint rate of 300 % after one complaint sent three times)
    node, arrival, mid = await _campaign_delivered(tmp_path, sink, make_node)
    port = node.listeners[0].port
    for _ in range(3):
        assert await send(port, "", ["fbl@mta.test"], _arf(arrival.mail_from, mid)) == {}
    # without a VERP the reported message's id tells one complaint from another
    for _ in range(2):
        assert await send(port, "", ["fbl@mta.test"], _arf(rcpts=["d@example.com"])) == {}
    assert await send(port, "", ["fbl@mta.test"],
                      _arf(message_id="<m2@x>", rcpts=["d@example.com"])) == {}
    rates = {(r["pool"], r["domain"]): r for r in node.feedback.rates.rates()}
    assert rates[("bulk", "example.com")]["complaints"] == 1
    await node.stop()
    assert [r["rcpt"] for r in records(tmp_path) if r["type"] == "f"] == [
        "c@example.com", "d@example.com", "d@example.com"]


async def test_the_same_bounce_sent_again_is_one_bounce(tmp_path, sink, make_node):
    # the evidence for suppression counted it once, but each copy was an "rb" record and a
    # bounce in the pool's bounce rate (75 % after one delivery bounced, sent three times)
    node, send_dsn = await _campaign_to_a(tmp_path, sink, make_node, [
        FailedRecipient("a@example.com", "failed", "5.1.1", "550 5.1.1 no such user",
                        "mx.example.com")])
    for _ in range(3):
        await send_dsn()
    await until(lambda: node.reputation.bounce_rate("bulk") is not None, what="the rates")
    assert node.reputation.bounce_rate("bulk") == 0.5  # one delivered, then one bounce
    await node.stop()
    assert [r["type"] for r in records(tmp_path) if r["type"] in ("rb", "rd")] == ["rb"]


async def test_an_undecodable_byte_in_a_complained_address_does_not_name_another_one(
        tmp_path, sink, make_node):
    # "j\xf6rg@example.com" (ISO-8859-1, not UTF-8): the byte became U+FFFD and the address
    # pattern took what followed it, so rg@example.com, someone else, was suppressed
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    report = _arf(rcpts=["<ok@example.com>", "HERE", "x@mail.exHERE"]).replace(
        b"HERE", b"j\xf6rg@example.com", 1).replace(b"HERE", b"\xe4mple.com")
    assert await send(port, "", ["fbl@mta.test"], report) == {}
    assert not node.feedback.suppression.check(["rg@example.com", "x@mail.ex"])
    assert node.feedback.suppression.check(["ok@example.com"])
    await node.stop()
    assert [r["rcpt"] for r in records(tmp_path) if r["type"] == "f"] == ["ok@example.com"]


async def test_a_quoted_local_part_with_a_space_can_be_suppressed(tmp_path, sink, make_node):
    # "john doe"@example.com is a path the SMTP door takes (RFC 5321 quoted-string), and was
    # delivered to; the list refused it as "not an email address" (inner white space): its
    # hard bounce failed in the writer thread, its complaint was dropped, nothing stopped it
    rcpt = '"john doe"@example.com'
    sink.rcpt_replies = {rcpt: ["550 5.1.1 user unknown"]}
    node = await make_node(_config(tmp_path, sink.port, verp=False))
    port = node.listeners[0].port
    await send(port, "news@insurer.test", [rcpt], message("campaign", cls="marketing"))
    await until(lambda: node.feedback.suppression.check([rcpt]), what="the hard bounce")
    assert node.feedback.suppression.check([rcpt])[rcpt].scope == "best-effort"
    assert await send(port, "", ["fbl@mta.test"], _arf(rcpts=[f"<{rcpt}>"])) == {}
    assert node.feedback.suppression.check([rcpt], ["marketing"])[rcpt].source == "complaint"
    await node.stop()
    assert [r["rcpt"] for r in records(tmp_path) if r["type"] == "f"] == [rcpt]


async def test_a_complaint_about_a_policy_notice_stops_newsletters_not_notices(
        tmp_path, sink, make_node):
    # docs/feedback.md, Scopes: a complaint is scoped to marketing, whatever class the
    # reported message had; the next regulatory notice is still delivered (checked, fine)
    node = await make_node(_config(tmp_path, sink.port, verp=False))
    port = node.listeners[0].port
    await send(port, "sender@insurer.test", ["p@example.com"], message("notice",
                                                                        cls="policy-documents"))
    await sink.wait_for(1)
    assert await send(port, "", ["fbl@mta.test"], _arf(rcpts=["p@example.com"])) == {}
    await send(port, "sender@insurer.test", ["p@example.com"], message("newsletter",
                                                                        cls="marketing"))
    await send(port, "sender@insurer.test", ["p@example.com"], message("notice 2",
                                                                        cls="policy-documents"))
    arrivals = await sink.wait_for(2)
    await node.stop()
    assert sorted(email.message_from_bytes(a.data)["Subject"] for a in arrivals) == [
        "notice", "notice 2"]
    assert [r["class"] for r in records(tmp_path) if r["type"] == "s"] == ["marketing"]
