"""The relay: one SMTP transaction at a time, on a connection the scheduler asked it to open,
and the classification of every reply into one outcome per recipient (delivered, bounced or
deferred, with the reply and the connection's TLS facts). The scheduler drives it: it owns the
worker loop and the connection slots, and records the outcomes (scheduler/delivery.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from ..config import Config
from ..spool import Attempt, Message, Recipient, Spool
from .client import Reply, SMTPConnection, SMTPError, Timeouts
from .mx import Destination, DNSNullMX, DNSPermError, DNSTempError, MXResolver
from .route import Route, Source
from .tlspolicy import HostPlan, NoUsableMX, TLSPolicy
from .tlsrpt import TLSReports

log = logging.getLogger("postlane.relay")

DELIVERED, BOUNCED, DEFERRED = "delivered", "bounced", "deferred"


def _original_sender(msg: Message, rcpt: Recipient) -> str:
    return msg.mail_from


def _retrieve(fut: asyncio.Future) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        fut.exception()


def status_of(reply: Reply) -> str:
    """The RFC 3463 status of a reply: its own enhanced code, else one derived from the class;
    4.5.0 (protocol error) for a 3xx where a final reply was due (RFC 3463 has no class 3:
    a 354 to RCPT was recorded, and reported in delay DSNs, as "3.0.0")."""
    if reply.enhanced:
        return reply.enhanced
    if 300 <= reply.code < 400:
        return "4.5.0"
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


def _version(ip: str) -> int | None:
    try:
        return ipaddress.ip_address(ip).version
    except ValueError:
        return None


def families(dests: list[Destination]) -> frozenset[int]:
    """The IP versions of ``dests`` (empty when one is no IP address: any source may do)."""
    versions = {_version(d.ip) for d in dests}
    return frozenset() if None in versions else frozenset(v for v in versions if v)


def reachable(dests: list[Destination], source_ip: str) -> list[Destination]:
    """The addresses a connection bound to ``source_ip`` can reach: those of its family, as
    Postfix's ``inet_protocols`` does. A pool of IPv4 addresses sending to an MX that also has
    IPv6 addresses (Gmail's, every big provider's) tried those too and failed each with "no
    matching local address" in the record, and an IPv6-only MX got that as its reason.
    Without a source address (a pool of none) the system chooses: every address is kept."""
    version = _version(source_ip) if source_ip else None
    if version is None:
        return dests
    return [d for d in dests if _version(d.ip) in (version, None)]


class SessionLost(Exception):
    """The session failed before the transaction got going (the connection lost, a timeout or
    a garbled reply at MAIL, a 421 to MAIL), or is spent (every recipient of a transaction
    refused for a recipient limit after the session delivered): a fault of the server, not of
    the message, so the batch goes on a new session (``Hosts.lost``)."""

    def __init__(self, error: SMTPError, settled: dict[int, Outcome] | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.settled = settled or {}
        """Outcomes, by index in the batch, of the recipients an earlier transaction of the
        same ``transact`` settled (the server's recipient limit split the batch): those are
        recorded, only the rest of the batch goes on to the next session."""


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
        except DNSNullMX as exc:  # RFC 7505 3: 556 5.1.10, and nothing is connected to
            return Failed(Outcome(BOUNCED, f"556 5.1.10 {exc}", "5.1.10", "bad-domain"))
        except DNSPermError as exc:
            return Failed(Outcome(BOUNCED, f"550 5.1.2 {exc}", "5.1.2", "bad-domain"))
        except DNSTempError as exc:
            return Failed(Outcome(DEFERRED, f"451 4.4.3 {exc}", "4.4.3"), unreachable=True)

    async def connect(self, lane: Route, slot: Source, dests: list[Destination],
                      relaxed: bool = False) -> Hosts | Failed:
        """The hosts of one delivery attempt to ``lane`` from ``slot``, with a connection to
        the first that takes one under the TLS policy, or the outcome for the batch that
        waited. ``relaxed``: the connection of a mailed TLS-RPT report (``is_report``), made
        under the report's relaxed policy (``TLSPolicy.relaxed``): the caller sends that
        report alone on it."""
        info = {"source_ip": slot.address, "vmta": slot.ehlo}
        usable = reachable(dests, slot.address)
        if not usable:  # an IPv6-only MX from an IPv4 pool: say so, connect to nothing
            names = ", ".join(dict.fromkeys(d.host for d in dests))
            return Failed(Outcome(DEFERRED, f"451 4.4.4 {names}: no IPv{_version(slot.address)}"
                                  f" address for the source address {slot.address}", "4.4.4"),
                          info, True)
        try:
            plans = await self.tls.plan(lane, usable, self.route(lane.domain) is not None,
                                        slot.address, relaxed)
        except NoUsableMX as exc:
            return Failed(Outcome(DEFERRED, str(exc.reply), status_of(exc.reply)), info, True)
        hosts = Hosts(self, lane, slot, plans[:self.config.relay.mx_address_limit], info)
        opened = await hosts.next()
        return opened if isinstance(opened, Failed) else hosts

    @staticmethod
    def facts(conn: SMTPConnection, slot: Source) -> dict[str, str]:
        """The connection's facts every outcome's record carries (addresses, MX, TLS)."""
        return {"source_ip": slot.address, "dest_ip": conn.peer_ip, "mx": conn.server_name,
                "tls": conn.tls_version or "", "cipher": conn.tls_cipher or "",
                "tls_auth": conn.tls_auth, "tls_policy": conn.tls_policy, "vmta": slot.ehlo,
                "dsn": "yes" if "DSN" in conn.extensions else ""}

    async def transact(self, conn: SMTPConnection, batch: list[Recipient],
                       info: dict[str, str]) -> list[Outcome]:
        """Send one message to the recipients of ``batch`` (all of one message) and return
        one outcome per recipient, in the batch's order.

        Recipients refused with 452 4.5.3 "too many recipients" by a transaction that took
        others go at once in the next transaction on the same connection (RFC 5321
        4.5.3.1.10), as long as each transaction takes some: a server's recipient limit
        (Postfix's ``smtpd_recipient_limit``) is no reason to defer them to the class's
        retry. When the session ends before a follow-up (lost at its MAIL, or closed after the
        transaction that delivered), ``SessionLost`` carries the outcomes settled so far and
        the rest of the batch goes on a new session (``Hosts.lost``: the same host again, as
        it delivered), still not to the retry. So does a transaction whose every recipient is
        refused for the limit on a session that delivered before (this message's transaction
        or an earlier message's): the server counts recipients per session, not per
        transaction, and the session is spent while it stays open. A session that delivered
        nothing is not reopened (its batch waits for the retry): no loop."""
        msg = batch[0].msg
        try:
            body = await self.spool.load_body(msg.id)
        except KeyError:
            log.error("body of %s missing from the spool", msg.id)
            return [Outcome(DEFERRED, "451 4.3.0 message body missing from spool", "4.3.0")
                    ] * len(batch)
        outcomes = await self._transact_once(conn, batch, info, body)
        pending = list(range(len(batch)))
        latest = outcomes
        while True:
            over = [i for i, out in zip(pending, latest, strict=True) if _too_many(out)]
            if not over:
                break
            if len(over) == len(pending):  # this transaction took none of them
                if conn.messages_sent == 0:
                    break  # not even the session's first: the retry
                # a limit per session, reached by the transactions that delivered: QUIT and
                # go on with the rest on a new session (from the same slot)
                raise SessionLost(SMTPError("rcpt", "every recipient over the server's"
                                                    f" recipient limit: {latest[0].reply}"),
                                  _settled(outcomes, over))
            if not conn.usable:
                if not any(out.kind == DELIVERED for out in outcomes):
                    break  # the server ended it without taking this message: the retry
                # the server ended the session after the transaction that delivered: the rest
                # go on a new session of the attempt, not to the class's retry
                raise SessionLost(SMTPError("mail", "session ended with recipients over the"
                                                    " server's recipient limit left"),
                                  _settled(outcomes, over))
            pending = over
            try:
                latest = await self._transact_once(conn, [batch[i] for i in pending], info, body)
            except SessionLost as lost:
                lost.settled = _settled(outcomes, pending)
                raise
            for i, out in zip(pending, latest, strict=True):
                outcomes[i] = out
        return outcomes

    async def _transact_once(self, conn: SMTPConnection, batch: list[Recipient],
                             info: dict[str, str], body: bytes) -> list[Outcome]:
        """One SMTP transaction of ``body`` to the recipients of ``batch``."""
        msg = batch[0].msg
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
        if marked.done() and marked.exception() is not None:  # no journal, no delivery: wait
            reply = f"451 4.3.0 {marked.exception()}"
            return [Outcome(DEFERRED, reply, "4.3.0")] * len(batch)
        try:
            tx = await conn.send(self.envelope_sender(msg, batch[0]), rcpts, body,
                                 " ".join(params), crlf=True, before_dot=marked,
                                 smtputf8=msg.smtputf8)
        except SMTPError as exc:
            if exc.stage == "mail":  # nothing of the message got through: the server failed
                raise SessionLost(exc) from exc
            reply = str(exc.reply) if exc.reply else f"451 4.4.2 {exc}"
            if exc.reply is not None and exc.reply.is_perm:
                return [Outcome(BOUNCED, reply, status_of(exc.reply))] * len(batch)
            return [Outcome(DEFERRED, reply, "4.4.2")] * len(batch)
        if tx.mail_reply.code == 421:  # the server closes the session, whatever the message
            raise SessionLost(SMTPError("mail", f"MAIL answered {tx.mail_reply}",
                                        tx.mail_reply))
        log.debug("%s: %d rcpt in %.1f ms", msg.id, len(batch),
                  (time.monotonic() - started) * 1000)
        out = []
        for rreply in tx.rcpt_replies[:len(batch)]:
            final = rreply
            if not tx.mail_reply.is_ok:
                final = tx.mail_reply
            elif rreply.is_ok:
                final = tx.data_reply or Reply(451, "4.4.2 no data reply", "4.4.2")
            out.append(_outcome(final))
        # MAIL refused before any RCPT was answered
        out += [_outcome(tx.mail_reply)] * (len(batch) - len(out))
        return out


def _settled(outcomes: list[Outcome], pending: list[int]) -> dict[int, Outcome]:
    """The outcomes of the recipients not in ``pending``, by index."""
    left = set(pending)
    return {i: out for i, out in enumerate(outcomes) if i not in left}


def _outcome(reply: Reply) -> Outcome:
    """``Outcome.of``, reading RFC 821's 552 "too many recipients" as the 452 it is (RFC 5321
    4.5.3.1.10: clients should treat it as temporary): never a bounce. A 5xx with RFC 3463's
    X.5.3 ("too many recipients"; the rest "to be delivered on a subsequent delivery
    attempt") is that refusal whatever its words, as ``552 5.5.3 Recipient limit exceeded``."""
    if reply.is_perm and (reply.enhanced == "5.5.3" or (
            reply.code == 552 and "too many recipients" in reply.text.lower())):
        return Outcome(DEFERRED, str(reply), "4.5.3")
    return Outcome.of(reply)


def _too_many(out: Outcome) -> bool:
    """A refusal for the server's recipient limit: X.5.3 (``_outcome`` makes a 5xx one 4.5.3),
    or a 452 or 552 saying so without a code."""
    return out.kind == DEFERRED and (out.status == "4.5.3" or (
        out.reply[:3] in ("452", "552") and "too many recipients" in out.reply.lower()))


class Hosts:
    """The hosts of one delivery attempt, in order, and how far down them it has gone.

    As Postfix's SMTP client does (RFC 5321 5.1: try the next MX), a session that fails before
    its transaction gets going moves on to the next address, of the same host or the next MX:
    no connection, a greeting other than 2xx, EHLO, STARTTLS (under what the TLS policy
    allows), or the session lost at MAIL (``SessionLost``). A reply to RCPT or DATA is about
    the message and never does. A 5xx greeting skips the server too (Postfix's
    ``smtp_skip_5xx_greeting``): when every host was skipped the mail is deferred. At most
    ``relay.mx_address_limit`` addresses are tried (the caller cuts the list), and at most
    ``relay.mx_session_limit`` sessions that got through EHLO and TLS and then failed. One
    connection at a time, from the one source slot: the per-IP caps hold."""

    def __init__(self, relay: Relay, lane: Route, slot: Source, plans: list[HostPlan],
                 info: dict[str, str]) -> None:
        self._relay = relay
        self._lane = lane
        self._slot = slot
        self._plans = plans
        self._info = info
        self._next = 0
        self._sessions = 0
        self._delivered = False
        self._last: tuple[HostPlan, SMTPError] | None = None
        self._current: HostPlan | None = None
        self.conn: SMTPConnection | None = None
        """The connection open now (set by ``next``)."""

    async def next(self) -> SMTPConnection | Failed:
        """A connection to the next host that takes one, or the batch's outcome when none is
        left (the last failure tells it)."""
        relay = self._relay
        limit = relay.config.relay.mx_session_limit
        while self._next < len(self._plans) and self._sessions < limit:
            plan = self._plans[self._next]
            self._next += 1
            try:
                self.conn = await relay.tls.connect(plan, self._slot, relay.timeouts)
                self._current = plan
                return self.conn
            except SMTPError as exc:  # the lane's outage is told once (Health), not each try
                log.debug("connect %s via %s [%s]:%s failed: %s", self._lane.domain,
                          self._slot.address, plan.dest.ip, plan.dest.port, exc)
                self._last = plan, exc
        self.conn = None
        return self._failed()

    async def lost(self, exc: SessionLost) -> SMTPConnection | Failed:
        """The open session failed (``exc``): close it and go on to the next host.

        A session that had answered a transaction to its end (delivered or refused) before
        it was lost is reopened to the same host first: the server is up and talking; it
        ended the session, as Exim does after ``smtp_accept_max_per_connection`` MAIL
        commands (421) or as an idle timeout or an error limit racing our next MAIL does (a
        close), or as a server counting recipients per session refuses every further one
        (452 4.5.3, ``Relay.transact``). The batch waited for its class's retry (15 minutes
        for marketing) with a deferral on its record; after a session that only refused, the
        lane was also reported unreachable and suspended. The session is QUIT before the
        next is opened: one connection per slot. Each reopening needs a session that answered
        a transaction, so it cannot loop; a reopened session lost before that is counted and
        moved on from as any other."""
        conn, plan = self.conn, self._current
        assert conn is not None and plan is not None
        log.debug("session %s [%s] lost: %s", conn.server_name, conn.peer_ip, exc)
        self._last = plan, exc.error
        await conn.quit()  # closed before the next is opened: one connection per slot
        if conn.messages_sent > 0:
            self._delivered = True
        if conn.transactions > 0:
            relay = self._relay
            try:
                self.conn = await relay.tls.connect(plan, self._slot, relay.timeouts)
                return self.conn
            except SMTPError as again:
                self._last = plan, again
        self._sessions += 1
        return await self.next()

    def _failed(self) -> Failed:
        info = dict(self._info)
        if self._last is None:  # no address at all (never: plan() raises instead)
            return Failed(Outcome(DEFERRED, "451 4.4.1 no host to try", "4.4.1"), info, True)
        plan, last = self._last
        # the evidence: the last host tried, and the policy it was held to
        info.update(mx=plan.dest.host, dest_ip=plan.dest.ip, tls_policy=plan.policy)
        reply = last.reply
        # a session that delivered before it was lost: the destination is up, only this
        # batch waits (its lane is not suspended)
        unreachable = not self._delivered
        if reply is None:  # 4.4.2: lost at MAIL, as a transaction's failure says (transact)
            status = "4.4.2" if last.stage == "mail" else "4.4.1"
            return Failed(Outcome(DEFERRED, f"451 {status} {last}", status), info, unreachable)
        if reply.is_perm and last.stage == "banner":  # skipped, as a temporary failure
            status = "4" + status_of(reply)[1:]
            return Failed(Outcome(DEFERRED, str(reply), status), info, unreachable)
        if reply.is_perm and not last.temporary:
            return Failed(Outcome(BOUNCED, str(reply), status_of(reply), "bad-connection"), info)
        return Failed(Outcome(DEFERRED, str(reply), status_of(reply)), info, unreachable)
