"""The relay: one SMTP transaction at a time, on a connection the scheduler asked it to open,
and the classification of every reply into one outcome per recipient (delivered, bounced or
deferred, with the reply and the connection's TLS facts). The scheduler drives it: it owns the
worker loop and the connection slots, and records the outcomes (scheduler/delivery.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from ..config import Config
from ..spool import Attempt, Message, Recipient, Spool
from .client import Reply, SMTPConnection, SMTPError, Timeouts
from .mx import Destination, DNSPermError, DNSTempError, MXResolver
from .route import Route, Source
from .tlspolicy import NoUsableMX, TLSPolicy
from .tlsrpt import TLSReports

log = logging.getLogger("postlane.relay")

MAX_HOSTS_TRIED = 5

DELIVERED, BOUNCED, DEFERRED = "delivered", "bounced", "deferred"


def _original_sender(msg: Message, rcpt: Recipient) -> str:
    return msg.mail_from


def _retrieve(fut: asyncio.Future) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        fut.exception()


def status_of(reply: Reply) -> str:
    """The RFC 3463 status of a reply: its own enhanced code, else one derived from the class."""
    if reply.enhanced:
        return reply.enhanced
    return f"{reply.code // 100}.0.0"


@dataclass(slots=True, frozen=True)
class Outcome:
    """What became of one recipient in one attempt; ``category`` "" lets the scheduler's
    classifier name the bounce category from the reply."""

    kind: str
    """DELIVERED, BOUNCED or DEFERRED."""
    reply: str
    status: str
    category: str = ""

    @classmethod
    def of(cls, reply: Reply) -> Outcome:
        """The outcome a recipient's final reply means: 2xx delivered, 5xx bounced, else
        deferred."""
        kind = DELIVERED if reply.is_ok else BOUNCED if reply.is_perm else DEFERRED
        return cls(kind, str(reply), status_of(reply))


@dataclass(slots=True)
class Failed:
    """No connection: every recipient of the batch gets ``outcome``. ``unreachable``: the
    destination cannot be reached at all (DNS, every MX), so the scheduler suspends its lane."""

    outcome: Outcome
    info: dict[str, str] = field(default_factory=dict)
    unreachable: bool = False


class Relay:
    """Opens connections and performs transactions for the scheduler; decides nothing about
    the queue."""

    def __init__(self, config: Config, spool: Spool, resolver: MXResolver,
                 reports: TLSReports | None = None,
                 envelope_sender: Callable[[Message, Recipient], str] = _original_sender,
                 ) -> None:
        self.config = config
        self.spool = spool
        self.resolver = resolver
        self.tls = TLSPolicy(config, resolver, reports)
        rc = config.relay
        self.timeouts = Timeouts(connect=rc.connect_timeout, banner=rc.command_timeout,
                                 command=rc.command_timeout, data_block=rc.data_timeout,
                                 dot=rc.data_timeout)
        self.envelope_sender = envelope_sender
        """The MAIL FROM per message and recipient (the feedback loop gives VERP senders)."""

    def route(self, domain: str) -> str | None:
        return self.config.routes.get(domain) or self.config.routes.get("*")

    async def destinations(self, domain: str) -> list[Destination]:
        route = self.route(domain)
        if route:
            host, _, port = route.rpartition(":")
            return await self.resolver.resolve_host(host.strip("[]"), int(port))
        return await self.resolver.destinations(domain, self.config.relay.smtp_port)

    async def resolve(self, domain: str) -> list[Destination] | Failed:
        """The hosts to try for ``domain`` (its route, else its MX), or why there are none."""
        try:
            return await self.destinations(domain)
        except DNSPermError as exc:
            return Failed(Outcome(BOUNCED, f"550 5.1.2 {exc}", "5.1.2", "bad-domain"))
        except DNSTempError as exc:
            return Failed(Outcome(DEFERRED, f"451 4.4.3 {exc}", "4.4.3"), unreachable=True)

    async def connect(self, lane: Route, slot: Source,
                      dests: list[Destination]) -> SMTPConnection | Failed:
        """A connection from ``slot`` to the first host of ``dests`` that takes one under the
        TLS policy (at most MAX_HOSTS_TRIED), or the outcome for the batch that waited."""
        info = {"source_ip": slot.address, "vmta": slot.ehlo}
        try:
            plans = await self.tls.plan(lane, dests, self.route(lane.domain) is not None,
                                        slot.address)
        except NoUsableMX as exc:
            return Failed(Outcome(DEFERRED, str(exc.reply), status_of(exc.reply)), info, True)
        last: SMTPError | None = None
        for plan in plans[:MAX_HOSTS_TRIED]:
            try:
                return await self.tls.connect(plan, slot, self.timeouts)
            except SMTPError as exc:  # the lane's outage is told once (Health), not each try
                log.debug("connect %s via %s [%s]:%s failed: %s", lane.domain, slot.address,
                          plan.dest.ip, plan.dest.port, exc)
                last = exc
        reply = str(last.reply) if last and last.reply else f"451 4.4.1 {last}"
        if last is not None and not last.temporary and last.reply is not None:
            return Failed(Outcome(BOUNCED, reply, status_of(last.reply), "bad-connection"), info)
        return Failed(Outcome(DEFERRED, reply,
                              status_of(last.reply) if last and last.reply else "4.4.1"),
                      info, True)

    @staticmethod
    def facts(conn: SMTPConnection, slot: Source) -> dict[str, str]:
        """The connection's facts every outcome's record carries (addresses, MX, TLS)."""
        return {"source_ip": slot.address, "dest_ip": conn.peer_ip, "mx": conn.server_name,
                "tls": conn.tls_version or "", "cipher": conn.tls_cipher or "",
                "tls_auth": conn.tls_auth, "tls_policy": conn.tls_policy, "vmta": slot.ehlo}

    async def transact(self, conn: SMTPConnection, batch: list[Recipient],
                       info: dict[str, str]) -> list[Outcome]:
        """Send one message to the recipients of ``batch`` (all of one message) and return
        one outcome per recipient, in the batch's order."""
        msg = batch[0].msg
        try:
            body = await self.spool.load_body(msg.id)
        except KeyError:
            log.error("body of %s missing from the spool", msg.id)
            return [Outcome(DEFERRED, "451 4.3.0 message body missing from spool", "4.3.0")
                    ] * len(batch)
        params = []
        if msg.envid:
            params.append(f"ENVID={msg.envid}")
        if msg.ret:
            params.append(f"RET={msg.ret}")
        rcpts = []
        for r in batch:
            extra = []
            if r.notify:
                extra.append(f"NOTIFY={r.notify}")
            if r.orcpt:
                extra.append(f"ORCPT={r.orcpt}")
            rcpts.append((r.address, " ".join(extra)))
        started = time.monotonic()
        # the attempt is on disk before its final dot: a crash between the remote's 250 and
        # our record of it then leaves "outcome unknown" in the trail, not silence
        cls = self.config.classes.get(msg.cls)
        info_text, now = orjson.dumps(info).decode(), time.time()
        marked = self.spool.mark([Attempt(msg.id, r.idx, now, info_text, r.attempts + 1)
                                  for r in batch], urgent=cls is not None and cls.sla is not None)
        marked.add_done_callback(_retrieve)  # a transaction refused before DATA never awaits it
        try:
            tx = await conn.send(self.envelope_sender(msg, batch[0]), rcpts, body,
                                 " ".join(params), crlf=True, before_dot=marked)
        except SMTPError as exc:
            reply = str(exc.reply) if exc.reply else f"451 4.4.2 {exc}"
            if exc.reply is not None and exc.reply.is_perm:
                return [Outcome(BOUNCED, reply, status_of(exc.reply))] * len(batch)
            return [Outcome(DEFERRED, reply, "4.4.2")] * len(batch)
        log.debug("%s: %d rcpt in %.1f ms", msg.id, len(batch),
                  (time.monotonic() - started) * 1000)
        out = []
        for rreply in tx.rcpt_replies[:len(batch)]:
            final = rreply
            if not tx.mail_reply.is_ok:
                final = tx.mail_reply
            elif rreply.is_ok:
                final = tx.data_reply or Reply(451, "4.4.2 no data reply", "4.4.2")
            out.append(Outcome.of(final))
        # MAIL refused before any RCPT was answered
        out += [Outcome.of(tx.mail_reply)] * (len(batch) - len(out))
        return out
