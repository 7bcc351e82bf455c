"""Delivery workers: one connection from one source IP to one destination, reused for as many
transactions as its lane has ready, and the classification of every reply into an outcome."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import orjson

from ..config import Config
from ..scheduler.lanes import Lane, SourceSlot
from ..scheduler.scheduler import Scheduler
from ..spool import Attempt, Message, Recipient, Spool, State
from .client import Reply, SMTPConnection, SMTPError, Timeouts
from .mx import Destination, DNSPermError, DNSTempError, MXResolver
from .tlspolicy import NoUsableMX, TLSPolicy
from .tlsrpt import TLSReports

log = logging.getLogger("postlane.relay")

MAX_HOSTS_TRIED = 5


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


class Relay:
    def __init__(self, config: Config, scheduler: Scheduler, spool: Spool,
                 resolver: MXResolver, reports: TLSReports | None = None) -> None:
        self.config = config
        self.scheduler = scheduler
        self.spool = spool
        self.resolver = resolver
        self.tls = TLSPolicy(config, resolver, reports)
        rc = config.relay
        self.timeouts = Timeouts(connect=rc.connect_timeout, banner=rc.command_timeout,
                                 command=rc.command_timeout, data_block=rc.data_timeout,
                                 dot=rc.data_timeout)
        self.envelope_sender: Callable[[Message, Recipient], str] = _original_sender
        """The MAIL FROM per message and recipient (the feedback loop sets VERP senders)."""

    def route(self, domain: str) -> str | None:
        return self.config.routes.get(domain) or self.config.routes.get("*")

    async def destinations(self, domain: str) -> list[Destination]:
        route = self.route(domain)
        if route:
            host, _, port = route.rpartition(":")
            return await self.resolver.resolve_host(host.strip("[]"), int(port))
        return await self.resolver.destinations(domain, self.config.relay.smtp_port)

    async def work(self, lane: Lane, slot: SourceSlot) -> None:
        """Run one connection's life: connect, deliver batches while the lane has them, QUIT."""
        sched = self.scheduler
        had_rule = lane.rule is not None
        batch = sched.next_batch(lane)
        if not batch:
            return
        conn = await self._connect(lane, slot, batch)
        if conn is None:
            return
        if not had_rule and lane.rate_key is not None and not sched.admit(lane):
            # the rule came with the MX lookup: this first message needs a rate token too
            for rcpt in batch:
                sched.requeue(rcpt)
            await conn.quit()
            return
        info = {"source_ip": slot.address, "dest_ip": conn.peer_ip, "mx": conn.server_name,
                "tls": conn.tls_version or "", "cipher": conn.tls_cipher or "",
                "tls_auth": conn.tls_auth, "tls_policy": conn.tls_policy, "vmta": slot.ehlo}
        limit = sched.max_messages_per_connection(lane)
        try:
            while batch:
                await sched.throttle(lane, slot)
                try:
                    await self._transact(conn, batch, info)
                except Exception:  # never strand a taken batch in memory: retry it later
                    log.exception("delivery of %s failed unexpectedly", batch[0].msg.id)
                    for rcpt in batch:
                        if rcpt.state is State.INFLIGHT:
                            sched.deferred(rcpt, "451 4.3.0 internal error during delivery",
                                           "4.3.0", info)
                    break
                if not conn.usable or conn.messages_sent >= limit:
                    break
                batch = await sched.wait_for_work(lane, self.config.relay.idle_timeout,
                                                  conn.messages_sent)
        finally:
            await conn.quit()

    async def _connect(self, lane: Lane, slot: SourceSlot,
                       batch: list[Recipient]) -> SMTPConnection | None:
        try:
            dests = await self.destinations(lane.domain)
        except DNSPermError as exc:
            for rcpt in batch:
                self.scheduler.bounced(rcpt, f"550 5.1.2 {exc}", "5.1.2", {}, "bad-domain")
            return None
        except DNSTempError as exc:
            self._defer_all(lane, batch, f"451 4.4.3 {exc}", "4.4.3", {})
            return None
        if lane.rule is None:
            name = self.scheduler.rules.for_mx([d.host for d in dests])
            if name:
                self.scheduler.set_rule(lane, name)
        info = {"source_ip": slot.address, "vmta": slot.ehlo}
        try:
            plans = await self.tls.plan(lane, dests, self.route(lane.domain) is not None,
                                        slot.address)
        except NoUsableMX as exc:
            self._defer_all(lane, batch, str(exc.reply), status_of(exc.reply), info)
            return None
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
            for rcpt in batch:
                self.scheduler.bounced(rcpt, reply, status_of(last.reply), info,
                                       "bad-connection")
            return None
        self._defer_all(lane, batch, reply,
                        status_of(last.reply) if last and last.reply else "4.4.1", info)
        return None

    def _defer_all(self, lane: Lane, batch: list[Recipient], reply: str, status: str,
                   info: dict[str, str]) -> None:
        """The destination cannot be reached: defer this batch and suspend the lane so the rest
        of its queue waits without spending attempts."""
        for rcpt in batch:
            self.scheduler.deferred(rcpt, reply, status, info)
        cls = self.config.classes.get(batch[0].msg.cls)
        pause = min(cls.retry[0] if cls else 60.0, 60.0)
        health, key = self.scheduler.health, self.scheduler.outage_key(lane)
        health.begin(key, "destination", f"destination {lane.domain} unreachable from pool"
                     f" {lane.pool}", cause=reply, unit="deferrals",
                     effect=f"its mail is deferred; the lane waits {pause:.0f}s between tries")
        health.count(key, len(batch))
        self.scheduler.suspend(lane, pause, reply)

    async def _transact(self, conn: SMTPConnection, batch: list[Recipient],
                        info: dict[str, str]) -> None:
        msg = batch[0].msg
        sched = self.scheduler
        try:
            body = await self.spool.load_body(msg.id)
        except KeyError:
            log.error("body of %s missing from the spool", msg.id)
            for rcpt in batch:
                sched.deferred(rcpt, "451 4.3.0 message body missing from spool", "4.3.0", info)
            return
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
            for rcpt in batch:
                if exc.reply is not None and exc.reply.is_perm:
                    sched.bounced(rcpt, reply, status_of(exc.reply), info)
                else:
                    sched.deferred(rcpt, reply, "4.4.2", info)
            return
        log.debug("%s: %d rcpt in %.1f ms", msg.id, len(batch),
                  (time.monotonic() - started) * 1000)
        for rcpt, rreply in zip(batch, tx.rcpt_replies, strict=False):
            final = rreply
            if not tx.mail_reply.is_ok:
                final = tx.mail_reply
            elif rreply.is_ok:
                final = tx.data_reply or Reply(451, "4.4.2 no data reply", "4.4.2")
            self._settle(rcpt, final, info)
        for rcpt in batch[len(tx.rcpt_replies):]:  # MAIL refused before any RCPT was answered
            self._settle(rcpt, tx.mail_reply, info)

    def _settle(self, rcpt: Recipient, reply: Reply, info: dict[str, str]) -> None:
        text = str(reply)
        if reply.is_ok:
            self.scheduler.delivered(rcpt, text, status_of(reply), info)
        elif reply.is_perm:
            self.scheduler.bounced(rcpt, text, status_of(reply), info)
        else:
            self.scheduler.deferred(rcpt, text, status_of(reply), info)
