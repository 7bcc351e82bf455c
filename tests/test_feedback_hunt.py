"""Hostile and repeated reports at the node's feedback addresses, through SMTP."""

from __future__ import annotations

import time

from postlane.feedback.dsn import FailedRecipient, build_bounce
from tests.conftest import message, records, send
from tests.test_feedback_node import _config


async def test_a_dsn_naming_our_recipient_delayed_does_not_bounce_it_for_another(
        tmp_path, sink, make_node):
    # the DSN came back to a@'s VERP address and says a@ is delayed, some other address
    # failed: a@ was given the other one's 5.1.1 and suppressed
    node = await make_node(_config(tmp_path, sink.port))
    port = node.listeners[0].port
    await send(port, "news@insurer.test", ["a@example.com"], message("campaign", cls="marketing"))
    [arrival] = await sink.wait_for(1)
    dsn = build_bounce(reporting_mta="mx.example.com", sender=arrival.mail_from,
                       recipients=[FailedRecipient("a@example.com", "delayed", "4.2.2",
                                                   "452 4.2.2 mailbox full", "mx.example.com"),
                                   FailedRecipient("other@example.org", "failed", "5.1.1",
                                                   "550 5.1.1 no such user", "mx.example.org")],
                       original=arrival.data, arrival_date=time.time(), ret="HDRS")
    assert await send(port, "", [arrival.mail_from], dsn) == {}
    assert not node.feedback.suppression.check(["a@example.com", "other@example.org"])
    await node.stop()
    reports = [(r["type"], r["rcpt"], r["dsnAction"], r["dsnStatus"]) for r in records(tmp_path)
               if r["type"] in ("rb", "rd")]
    assert reports == [("rd", "a@example.com", "delayed", "4.2.2")]
