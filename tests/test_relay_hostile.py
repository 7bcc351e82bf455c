"""The relay against hostile and odd receivers, end to end through a node (the scripted
receiver of ``tests/test_relay_quirks.py``): whatever the receiver says, each recipient ends
delivered, deferred or bounced with a record whose status is a valid RFC 3463 code, the node
logs no traceback, and a receiver's misbehaviour never counts against the next message."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import OPERATOR, message, records, send
from tests.support.waiting import until
from tests.test_relay_quirks import (
    CLOSE,
    Conversation,
    Receiver,
    no_tracebacks,
    outcomes,
    quick_config,
)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    yield r
    await r.stop()


async def _notice(tmp_path, make_node, receiver: Receiver, rcpts: list[str]):
    """Start the receiver and a node sending to it, and submit one policy notice."""
    port = await receiver.start()
    node = await make_node(quick_config(tmp_path, port))
    await send(node.listeners[0].port, "s@insurer.test", rcpts, message(cls="policy-documents"))
    return node


def _rows(tmp_path, rcpt: str) -> list[dict]:
    return [r for r in records(tmp_path) if r["type"] not in ("r", "o") and r["rcpt"] == rcpt]


async def test_a_size_of_thousands_of_digits_is_no_limit(tmp_path, make_node, receiver,
                                                         caplog):
    """``250 SIZE 999…9`` (5,000 digits): larger than any message, so no limit. Python's int()
    refuses strings of more than 4,300 digits: the ValueError escaped the EHLO parser, every
    attempt was deferred "451 4.3.0 internal error during delivery" with a traceback in the
    log, and the next MX was never tried."""
    receiver.ehlo = b"250-quirk.test\r\n250-PIPELINING\r\n250 SIZE " + b"9" * 5000 + b"\r\n"
    node = await _notice(tmp_path, make_node, receiver, ["a@example.com"])
    await until(lambda: outcomes(tmp_path), what="an outcome")
    await node.stop()
    assert outcomes(tmp_path) == [("a@example.com", "d")], records(tmp_path)
    no_tracebacks(caplog)


async def test_a_close_at_the_next_mail_after_a_refusal_reopens(tmp_path, make_node, receiver,
                                                               caplog):
    """The receiver refuses message 1 at its final dot (550), then hangs up when the next
    MAIL comes (its idle timeout, or its error limit, racing our MAIL). Message 2 goes at once
    on a new connection. It was deferred "451 4.4.2 mail: connection is not usable" though
    nothing of it had been sent, and the destination was reported unreachable and its lane
    suspended: only a session that had delivered was reopened."""
    def script(conv: Conversation, verb: bytes, line: bytes) -> bytes | None:
        return CLOSE if verb == b"MAIL" and conv.number == 1 and b"second@" in line else None

    receiver.script = script
    receiver.dot = lambda conv: (b"550 5.7.1 rejected as spam\r\n" if conv.number == 1
                                 else b"250 2.0.0 Ok: queued\r\n")
    port = await receiver.start()
    node = await make_node(quick_config(tmp_path, port).replace("max_smtp_out = 4",
                                                               "max_smtp_out = 1"))
    await node.operations.pause("bulk", who=OPERATOR)  # queue both, then one session
    for sender in ("first@insurer.test", "second@insurer.test"):
        await send(node.listeners[0].port, sender, ["a@example.com"], message(cls="marketing"))
    await node.operations.resume("bulk", who=OPERATOR)
    await until(lambda: receiver.received, what="message 2's delivery")
    await node.stop()
    rows = [(r["orig"], r["type"]) for r in records(tmp_path)
            if r["type"] not in ("r", "o") and r["rcpt"] == "a@example.com"]
    assert sorted(rows) == [("first@insurer.test", "b"), ("second@insurer.test", "d")], rows
    assert receiver.connections == 2 and receiver.peak == 1
    no_tracebacks(caplog)


async def test_a_354_to_rcpt_defers_with_a_valid_status_and_ends_reuse(tmp_path, make_node,
                                                                       receiver, caplog):
    """A ``354`` where RCPT wants 2xx/4xx/5xx (a receiver out of step, answering a command
    pipelined behind): that recipient is deferred with an RFC 3463 status (4.5.0, a protocol
    error), the other delivered, and the connection is not reused: what the server thinks the
    session is in is unknown. The record's status was "3.0.0" (no such class) and the
    connection was reused for the retry, which got the same 354 until the idle timeout."""
    receiver.script = lambda conv, verb, line: (
        b"354 go ahead\r\n" if verb == b"RCPT" and b"b@" in line and conv.number == 1 else None)
    node = await _notice(tmp_path, make_node, receiver, ["a@example.com", "b@example.com"])
    await until(lambda: len(receiver.received) >= 2, what="a's and b's deliveries")
    await node.stop()
    assert [r["type"] for r in _rows(tmp_path, "a@example.com")] == ["d"]
    rows = _rows(tmp_path, "b@example.com")
    assert [(r["type"], r["dsnStatus"]) for r in rows] == [("t", "4.5.0"), ("d", "2.0.0")], rows
    assert "354 go ahead" in rows[0]["dsnDiag"]
    assert [conn for conn, _, _ in receiver.received] == [1, 2]
    no_tracebacks(caplog)


async def test_a_250_to_data_is_a_stream_out_of_step_and_refuses_nobody(tmp_path, make_node,
                                                                         receiver, caplog):
    """A stray ``550`` ahead of the MAIL reply (one left over from an earlier transaction, or
    a receiver's bug), to a pipelining client: MAIL reads the 550, RCPT the MAIL's 250, DATA
    the RCPT's 250. The 250 to DATA says the replies are out of step with the commands, so
    none read can be trusted: every recipient is deferred and the retry delivers, never a
    bounce with the stray 550."""
    def script(conv: Conversation, verb: bytes, line: bytes) -> bytes | None:
        if verb == b"MAIL" and conv.number == 1:
            conv.rcpts, conv.mail = [], True
            return b"550 5.7.1 stray\r\n250 2.1.0 Ok\r\n"
        return None

    receiver.script = script
    node = await _notice(tmp_path, make_node, receiver, ["a@example.com"])
    await until(lambda: receiver.received, what="the retry's delivery")
    await node.stop()
    rows = [(r["type"], r["dsnStatus"]) for r in _rows(tmp_path, "a@example.com")]
    assert rows == [("t", "4.4.2"), ("d", "2.0.0")], rows
    no_tracebacks(caplog)


async def test_a_reply_nobody_asked_for_is_never_read_as_the_next_ones(tmp_path, make_node,
                                                                       receiver, caplog):
    """A greeting followed by a second reply nobody asked for (``250 extra``), to a client
    without PIPELINING: every later reply was read as the answer to the command before (EHLO
    got ``250 extra``, MAIL the EHLO's, RCPT a the MAIL's, RCPT b RCPT a's, DATA RCPT b's 550),
    so a recipient the server accepted bounced with another's 550. A reply waiting before a
    command is sent now ends the session: deferred, and the retry on a sane connection
    delivers a and bounces b."""
    receiver.greeting = b"220 quirk.test ESMTP\r\n250 extra\r\n"
    receiver.ehlo = b"250-quirk.test\r\n250 8BITMIME\r\n"
    receiver.script = lambda conv, verb, line: (
        b"550 5.1.1 no such user\r\n" if verb == b"RCPT" and b"b@" in line else None)
    node = await _notice(tmp_path, make_node, receiver, ["a@example.com", "b@example.com"])
    await until(lambda: outcomes(tmp_path), what="the first outcomes")
    receiver.greeting = b"220 quirk.test ESMTP\r\n"
    await until(lambda: receiver.received, what="a's delivery")
    await node.stop()
    assert [r["type"] for r in _rows(tmp_path, "a@example.com")][-2:] == ["t", "d"]
    assert [r["type"] for r in _rows(tmp_path, "b@example.com")][-2:] == ["t", "b"]
    assert all(r["dsnStatus"][0] in "245" for r in records(tmp_path) if r["dsnStatus"])
    no_tracebacks(caplog)


@pytest.mark.parametrize("dot", [
    b"".join(b"250-2.0.0 line %d\r\n" % i for i in range(150)) + b"250 2.0.0 queued\r\n",
    b"250 2.0.0 queued " + b"x" * 100_000 + b"\r\n",
], ids=["150-lines", "100-KB-line"])
async def test_a_long_final_250_is_one_delivery(tmp_path, make_node, receiver, caplog, dot):
    """A 250 to the final dot in 151 lines, or in one line of 100 KB: delivered, once. Past
    the reply caps (100 lines, 64 KB) the reply was refused as "too long": the message was
    deferred and sent again at every retry, a duplicate each time, until the expiry. What is
    past the caps is now read and dropped (memory stays bounded; the reply's deadline still
    ends a reply that never ends)."""
    receiver.dot = lambda conv: dot
    node = await _notice(tmp_path, make_node, receiver, ["a@example.com"])
    await until(lambda: outcomes(tmp_path), what="an outcome")
    await node.stop()
    rows = _rows(tmp_path, "a@example.com")
    assert [(r["type"], r["dsnStatus"]) for r in rows] == [("d", "2.0.0")], rows
    assert len(receiver.received) == 1 and len(rows[0]["dsnDiag"]) < 2000
    no_tracebacks(caplog)


async def test_a_stray_refusal_ahead_of_mail_bounces_nobody(tmp_path, make_node, receiver,
                                                           caplog):
    """A stray ``550`` ahead of the MAIL reply again, with a second recipient the server
    refuses: MAIL reads the 550, RCPT a the MAIL's 250, RCPT b a's 250, DATA b's 550, and
    nothing looks wrong until the RSET after it reads the DATA's real reply, a 354. Both
    recipients bounced with the stray 550 (a was accepted by the server). A 3xx to that RSET
    now says the replies are out of step: every recipient deferred; the retry delivers a and
    bounces b with its own 550."""
    def script(conv: Conversation, verb: bytes, line: bytes) -> bytes | None:
        if verb == b"MAIL" and conv.number == 1:
            conv.rcpts, conv.mail = [], True
            return b"550 5.7.1 stray\r\n250 2.1.0 Ok\r\n"
        if verb == b"RCPT" and b"b@" in line:
            return b"550 5.1.1 no such user\r\n"
        return None

    receiver.script = script
    node = await _notice(tmp_path, make_node, receiver, ["a@example.com", "b@example.com"])
    await until(lambda: receiver.received, what="the retry's delivery to a")
    await until(lambda: _rows(tmp_path, "b@example.com")[-1:]
                and _rows(tmp_path, "b@example.com")[-1]["type"] == "b", what="b's bounce")
    await node.stop()
    a = [(r["type"], r["dsnStatus"]) for r in _rows(tmp_path, "a@example.com")]
    b = [(r["type"], r["dsnStatus"]) for r in _rows(tmp_path, "b@example.com")]
    assert a == [("t", "4.4.2"), ("d", "2.0.0")], a
    assert b == [("t", "4.4.2"), ("b", "5.1.1")], b
    no_tracebacks(caplog)


async def test_a_421_after_the_refusals_lets_them_stand(tmp_path, make_node, receiver, caplog):
    """Postfix at its error limit (``smtpd_hard_error_limit``) sends ``421 4.7.0 Error: too
    many errors`` unasked, right after the reply that reached it: here after a pipelined
    DATA's 554. That is a server closing, not replies out of step: the recipient's 550 stands
    (a bounce), it is not deferred."""
    receiver.script = lambda conv, verb, line: (
        b"550 5.1.1 no such user\r\n" if verb == b"RCPT" else
        b"554 5.5.1 Error: no valid recipients\r\n421 4.7.0 Error: too many errors\r\n"
        if verb == b"DATA" else None)
    node = await _notice(tmp_path, make_node, receiver, ["a@example.com"])
    await until(lambda: _rows(tmp_path, "a@example.com"), what="a's outcome")
    await node.stop()
    rows = [(r["type"], r["dsnStatus"]) for r in _rows(tmp_path, "a@example.com")]
    assert rows == [("b", "5.1.1")], rows
    no_tracebacks(caplog)
