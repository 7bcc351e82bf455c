"""Peers as real MTAs behave: what the relay meets at receivers and must take in its stride.

The probes behind docs/operations.md ("Clients and peers checked") ran against Postfix, swaks,
curl, msmtp, nodemailer and aiosmtplib by hand; what they found is kept here with aiosmtpd
stand-ins, so CI needs none of those installed."""

from __future__ import annotations

import asyncio

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.conftest import OPERATOR, config_text, message, records, send


class _Handler:
    def __init__(self) -> None:
        self.received: list[list[str]] = []
        self.connections = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received.append(list(envelope.rcpt_tos))
        server.delivered += 1  # type: ignore[attr-defined]
        return "250 2.0.0 Ok"


class _CappedSMTP(SMTP):
    """A receiver that takes ``cap`` messages per connection, then ends the session at the
    next MAIL: with ``421`` as Exim does (smtp_accept_max_per_connection), or by closing
    without a word (a receiver's idle timeout racing our next MAIL)."""

    cap = 2
    how = "421"

    def __init__(self, handler: _Handler, **kwargs: object) -> None:
        super().__init__(handler, **kwargs)  # type: ignore[arg-type]
        self.delivered = 0
        handler.connections += 1

    async def smtp_MAIL(self, arg: str) -> None:
        if self.delivered >= self.cap:
            if self.how == "421":
                await self.push("421 4.7.0 Too many messages in this connection")
            assert self.transport is not None
            self.transport.close()
            return
        await super().smtp_MAIL(arg)


@pytest.mark.parametrize("how", ["421", "close"])
async def test_session_ended_after_n_messages_is_reopened_not_deferred(tmp_path, make_node,
                                                                       how):
    """A receiver that ends a session after N messages (421 to the next MAIL, or a close)
    wants a new connection, not a later retry: the message is sent at once on a fresh one,
    with no deferral on its record. Before, each Nth+1 message waited for its class's first
    retry (15 minutes for marketing) with a ``t`` record, though the receiver was up."""
    handler = _Handler()
    loop = asyncio.get_running_loop()
    capped = type("Capped", (_CappedSMTP,), {"how": how})
    server = await loop.create_server(lambda: capped(handler, decode_data=False),
                                      "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        node = await make_node(config_text(tmp_path, port, marketing_max_out=1))
        await node.operations.pause("bulk", who=OPERATOR)  # queue all five, then one session
        rcpts = [f"a{i}@example.com" for i in range(5)]
        for rcpt in rcpts:
            await send(node.listeners[0].port, "s@insurer.test", [rcpt],
                       message(cls="marketing"))
        await node.operations.resume("bulk", who=OPERATOR)
        async with asyncio.timeout(30):
            while len(handler.received) < 5:
                await asyncio.sleep(0.05)
        await node.stop()
        outcomes = [(r["rcpt"], r["type"], r["dsnDiag"]) for r in records(tmp_path)
                    if r["type"] not in ("r", "o")]
        assert sorted(outcomes) == sorted((r, "d", "smtp;250 2.0.0 Ok") for r in rcpts), \
            outcomes
        assert sorted(sum(handler.received, [])) == sorted(rcpts)  # each once
        assert handler.connections == 3  # 2 + 2 + 1: reopened twice, never in a loop
    finally:
        server.close()


class _RcptCappedSMTP(SMTP):
    """A receiver that takes 2 recipients per transaction and answers ``reply`` to the rest:
    452 4.5.3 as Postfix does past ``smtpd_recipient_limit`` (RFC 5321 4.5.3.1.10), or 552 as
    RFC 821 had it."""

    reply = "452 4.5.3 Error: too many recipients"

    def __init__(self, handler: _Handler, **kwargs: object) -> None:
        super().__init__(handler, **kwargs)  # type: ignore[arg-type]
        self.delivered = 0
        handler.connections += 1

    async def smtp_RCPT(self, arg: str) -> None:
        if self.envelope is not None and len(self.envelope.rcpt_tos) >= 2:
            await self.push(self.reply)
            return
        await super().smtp_RCPT(arg)


@pytest.mark.parametrize("reply", ["452 4.5.3 Error: too many recipients",
                                   "552 Too many recipients"])
async def test_too_many_recipients_go_in_the_next_transaction(tmp_path, make_node, reply):
    """452 4.5.3 "too many recipients" to some RCPTs of a transaction that took others: the
    rest are sent at once in further transactions on the same connection, as RFC 5321
    4.5.3.1.10 asks of a client, which is to read RFC 821's 552 for it as temporary too.
    Before, they were deferred to the class's retry (a ``t`` record each; 15 minutes for
    marketing) though the server was willing, and a 552 bounced them."""
    handler = _Handler()
    loop = asyncio.get_running_loop()
    capped = type("Capped", (_RcptCappedSMTP,), {"reply": reply})
    server = await loop.create_server(lambda: capped(handler, decode_data=False),
                                      "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        node = await make_node(config_text(tmp_path, port))
        rcpts = [f"a{i}@example.com" for i in range(5)]
        await send(node.listeners[0].port, "s@insurer.test", rcpts, message(cls="marketing"))
        async with asyncio.timeout(30):
            while sum(map(len, handler.received)) < 5:
                await asyncio.sleep(0.05)
        await node.stop()
        outcomes = [(r["rcpt"], r["type"]) for r in records(tmp_path)
                    if r["type"] not in ("r", "o")]
        assert sorted(outcomes) == [(r, "d") for r in rcpts], outcomes
        assert handler.received == [rcpts[:2], rcpts[2:4], rcpts[4:]]
        assert handler.connections == 1
    finally:
        server.close()

