"""``base_record`` builds its Record positionally (for speed): every value lands in the field
it is named for, whatever the order of Record's fields becomes."""

from __future__ import annotations

from postlane.accounting.records import Record
from postlane.scheduler.outcomes import base_record
from postlane.spool import Message, Recipient


def test_base_record_puts_each_value_in_its_named_field():
    msg = Message(id="Q1", cls="policy-documents", pool="critical", mail_from="s@insurer.test",
                  queued_at=1_800_000_000.25, deadline=1_800_000_120.0, expire_at=1_800_432_000.0,
                  priority=0, size=4321, envid="env-1", ret="HDRS", correlation_id="corr-1",
                  message_id="<m1@insurer.test>", listener="submission", auth_user="app",
                  client="192.0.2.7")
    rcpt = Recipient(msg=msg, idx=2, address="x@example.com", domain="example.com",
                     orcpt="rfc822;x@example.com", notify="FAILURE", attempts=3)
    now = 1_800_000_007.5
    expected = Record(type="d", time_logged=now, time_queued=msg.queued_at,
                      orig=msg.mail_from, rcpt=rcpt.address, queue_id=msg.id, cls=msg.cls,
                      vmta_pool=msg.pool, orcpt=rcpt.orcpt, env_id=msg.envid,
                      correlation_id=msg.correlation_id, message_id=msg.message_id,
                      job_id=msg.correlation_id, dlv_size=msg.size, attempt=rcpt.attempts,
                      total_seconds_queued=now - msg.queued_at, listener=msg.listener,
                      auth_user=msg.auth_user)
    assert base_record("d", rcpt, now) == expected
