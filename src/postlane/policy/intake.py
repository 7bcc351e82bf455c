"""Turning accepted mail into a queued message: classify, stamp, store durably, schedule.

Every way in (SMTP listeners, the HTTP injection API, bounces the node generates itself) goes
through ``Intake.submit``, so the rules are the same whichever door a message came through.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parseaddr
from typing import TYPE_CHECKING, Any

from ..accounting.records import Record
from ..address import address_literal, domain_key
from ..config import Config
from ..health import Health
from ..maildate import header_date
from ..spool import Message, Recipient, RecipientUpdate, Spool, SpoolUnavailable, local_dir
from ..spool.disk import DiskGuard, guarded_folders
from .headers import field_value, header_fields, join_fields, normalize_newlines, split_head
from .identity import envelope_sender
from .users import User, Users

if TYPE_CHECKING:
    from .dkim import Signer

_PRINTABLE = re.compile(r"[\x21-\x7e]*")
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]")

CLASS_HEADER = "x-postlane-class"
QUEUED_HEADER = "X-Postlane-Queued"
SINGLE_FIELDS = ("date", "from", "sender", "reply-to", "to", "cc", "bcc", "message-id",
                 "in-reply-to", "references", "subject")
"""RFC 5322 §3.6: each at most once in a message."""


class QueueIds:
    """Queue ids: 11 hex digits of milliseconds, the process's 32-bit tag and a 20-bit counter,
    so they sort by time in logs and need no coordination. Each node draws its tag at random
    and gives its intake workers the next ones: two nodes of a cluster share a tag by a chance
    of about 2 x 257 in 2^32 (a 16-bit tag, one per Python process, gave two nodes started in
    one process the same workers' ids: the spool refused the duplicate key, a 451)."""

    def __init__(self, tag: int | None = None) -> None:
        self.tag = tag if tag is not None else int.from_bytes(os.urandom(4), "big")
        self._counter = itertools.count()

    def new(self, now: float) -> str:
        return f"{int(now * 1000):011X}{self.tag:08X}{next(self._counter) & 0xFFFFF:05X}"


class Rejection(Exception):
    """Refuse a message with an SMTP reply (the HTTP API maps it to a 4xx/5xx status)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(slots=True)
class RcptIn:
    address: str
    notify: str = ""
    orcpt: str = ""
    checked: bool = False  # looked up in the suppression list at RCPT already
    suppressed: object | None = None
    """What that look-up found (the feedback loop's suppression ``Entry``: feedback stands above
    policy, so intake does not name its type)."""


def domain_of(address: str) -> str:
    """Lower-cased, in A-labels (the lane and the MX lookup of ``prüfer@exämple.org`` are
    those of ``xn--exmple-cua.org``), and interned: a campaign's 200,000 recipients share a few
    hundred domains."""
    # the edge refuses a bad name; the API and bounces are not the edge: ``domain_key`` keeps it
    return sys.intern(domain_key(address.rpartition("@")[2]))


def _header_safe(text: str) -> str:
    """Printable ASCII only: what goes into a header the node writes itself never carries a
    CR, LF or NUL, whatever the door it came through."""
    return text if _PRINTABLE.fullmatch(text) else _UNPRINTABLE.sub("?", text)


@functools.lru_cache(maxsize=4096)
def from_domain_of(value: str) -> str:
    """Domain of the (first) address in a From header value, lower-cased ("" if none).

    Cached: a campaign's messages share a few From values, and ``parseaddr`` (the RFC 5322
    address-list parser) was 1.6 % of the node's profile samples in the bench."""
    address = parseaddr(value)[1]
    return domain_of(address) if "@" in address else ""


def _never() -> bool:
    return False


class Intake:
    def __init__(self, config: Config, spool: Spool, scheduler, record: Callable[[Record], None],
                 signer: Signer | None = None, health: Health | None = None, *,
                 feedback: Any = None, audit_behind: Callable[[], bool] = _never) -> None:
        self.config = config
        self.signer = signer
        self.spool = spool
        self.scheduler = scheduler
        self.record = record
        """Tells the in-memory observers; the records themselves go into the spool with the
        message."""
        self.accepted = 0
        self.ids = QueueIds()
        """Replaced by an intake worker's own (``workers/process.py``)."""
        self.feedback = feedback
        """feedback.service.FeedbackService when the node wires one: suppression, List-Unsubscribe,
        inbound reports (the listeners ask it at RCPT and DATA)."""
        sec = config.security
        self.users = Users(sec.users_file) if sec.users_file else None
        """The SMTP users store (None: no users file, no AUTH); the edge's AUTH checks
        passwords against it (``edge/auth.py``)."""
        self.health = health or Health()
        self.disk = DiskGuard(guarded_folders(config, local_dir(config)), sec.min_free_space,
                              health=self.health)
        self.audit_behind = audit_behind
        """Whether the audit store is too far behind to take more (``AuditService.behind``)."""

    def classify(self, header_class: str | None, default_class: str | None,
                 user: User | None = None, *, mail_from: str = "", from_domain: str = "",
                 rcpt_domains: tuple[str, ...] = (), mt_priority: int | None = None) -> str:
        """In order: the X-Postlane-Class header, the AUTH user's default, the rules (envelope
        sender / From / recipient domain), MT-PRIORITY, the listener's default, the node's.
        An unknown class named in a header is refused, never silently demoted, and so is a class
        the AUTH user may not use."""
        if header_class:
            if header_class not in self.config.classes:
                raise Rejection(550, f"5.7.1 unknown traffic class {header_class!r}"
                                     f" in X-Postlane-Class")
            name: str | None = header_class
        else:
            name = ((user.default_class if user else None)
                    or self._by_rules(mail_from, from_domain, rcpt_domains)
                    or self._by_mt_priority(mt_priority) or default_class
                    or self.config.default_class)
        if not name:
            raise Rejection(550, "5.7.1 no traffic class for this message (set X-Postlane-Class)")
        if user is not None and not user.may_use(name):
            raise Rejection(550, f"5.7.1 user {user.name!r} may not send class {name!r}")
        return name

    def _by_rules(self, mail_from: str, from_domain: str,
                  rcpt_domains: tuple[str, ...]) -> str | None:
        sender_domain = domain_of(mail_from) if mail_from else ""
        for rule in self.config.classification.rules:  # A-labels, as domain_of gives them
            if rule.sender_domain and domain_key(rule.sender_domain) != sender_domain:
                continue
            if rule.from_domain and domain_key(rule.from_domain) != from_domain:
                continue
            if rule.recipient_domain and domain_key(rule.recipient_domain) not in rcpt_domains:
                continue
            return rule.cls
        return None

    def _by_mt_priority(self, mt_priority: int | None) -> str | None:
        """RFC 6710: the class of the highest configured priority not above the message's."""
        if mt_priority is None:
            return None
        ranked = sorted(((int(k), v) for k, v in self.config.classification.mt_priority.items()),
                        reverse=True)
        return next((name for floor, name in ranked if mt_priority >= floor), None)

    async def submit(self, mail_from: str, rcpts: list[RcptIn], data: bytes, *, envid: str = "",
                     ret: str = "", listener: str = "", client_ip: str = "",
                     client_name: str = "", auth_user: str = "", default_class: str | None = None,
                     src_type: str = "smtp", forced_class: str | None = None,
                     mt_priority: int | None = None, protocol: str = "ESMTP",
                     smtputf8: bool | None = None,
                     finals: Sequence[tuple[RecipientUpdate, Record]] = ()) -> str:
        """Queue a message durably and return its queue id (raises Rejection); ``protocol``
        is the Received field's "with" (RFC 3848). ``smtputf8``: the SMTP client gave the
        SMTPUTF8 parameter; None (mail made here, the HTTP API) asks for it when an address
        or a header field is not ASCII, as Postfix's ``smtputf8_autodetect_classes`` does.
        ``finals``: the final states (and records) of the recipients a DSN reports, committed
        with the DSN (or with its "s" records, when its recipient is suppressed)."""
        now = time.time()
        if src_type != "dsn" and not self.disk.ok():
            self.disk.refusal()
            raise Rejection(452, self.disk.TEXT)
        if src_type != "dsn" and self.audit_behind():
            raise Rejection(451, "4.3.0 Audit trail is behind, try again later")
        data = normalize_newlines(data)
        head, start = split_head(data)
        body = memoryview(data)[start:]  # not a copy: the message's bytes are copied once,
        # into ``content``, where the node's own fields go on top
        if smtputf8 is None:
            smtputf8 = not (mail_from.isascii() and head.isascii()
                            and all(r.address.isascii() for r in rcpts))
        fields = header_fields(head)
        header_class = None
        correlation = ""
        message_id = ""
        from_domain = ""
        corr_name = self.config.correlation_header.lower()
        kept = []
        for name, raw in fields:
            if name == CLASS_HEADER:
                header_class = header_class or field_value(raw)
                continue
            if name == corr_name and not correlation:
                correlation = field_value(raw)[:200]
            elif name == "message-id" and not message_id:
                message_id = field_value(raw)[:300]
            elif name == "from" and not from_domain:
                from_domain = from_domain_of(field_value(raw))
            kept.append((name, raw))
        user = self.users.get(auth_user) if self.users and auth_user else None
        cls_name = forced_class or self.classify(
            header_class, default_class, user, mail_from=mail_from, from_domain=from_domain,
            rcpt_domains=tuple({domain_of(r.address) for r in rcpts}), mt_priority=mt_priority)
        cls = self.config.classes[cls_name]
        if cls.sla is not None:  # a regulated message must mean one thing to every reader
            _refuse_repeated_fields(kept)
        qid = self.ids.new(now)
        if not message_id:
            message_id = f"<{qid}@{self.config.node.hostname}>"
            kept.append(("message-id", f"Message-ID: {message_id}".encode()))
        if not any(name == "date" for name, _ in kept):  # as submission servers do (RFC 6409)
            kept.append(("date", f"Date: {header_date(now)}".encode()))
        dropped: list[Record] = []
        if self.feedback is not None:
            rcpts, added, dropped = self.feedback.screen(
                queue_id=qid, now=now, cls=cls_name, pool=cls.pool, mail_from=mail_from,
                rcpts=rcpts, fields=kept, message_id=message_id, listener=listener)
            if not rcpts:  # every recipient suppressed: accepted and dropped ("s" records)
                if finals:  # one write: the final states and every record in one commit
                    self.spool.update([u for u, _ in finals], [*(r for _, r in finals),
                                                                *dropped])
                else:
                    self.spool.record(dropped, urgent=cls.sla is not None)
                await self.spool.flush()
                for rec in dropped:
                    self.record(rec)
                return qid
            kept.extend(added)
        # TCP-info as RFC 5321 4.4 has it: an address literal, "[IPv6:...]" for IPv6
        tcp_info = address_literal(client_ip) or _header_safe(client_ip) or "local"
        stamp = [
            ("received", (f"Received: from {_header_safe(client_name) or 'localhost'}"
                          f" ({tcp_info})"
                          f"\r\n\tby {self.config.node.hostname} (Postlane) with {protocol}"
                          f" id {qid};"
                          f"\r\n\t{header_date(now)}").encode()),
            ("x-postlane-queued", f"{QUEUED_HEADER}: {now:.3f}; id={qid}".encode()),
        ]
        signature, dkim_note = b"", ""
        if self.signer is not None:  # signed once, here, so the spooled body is the signed one
            signature, dkim_note = await self.signer.sign(
                kept, body, qid=qid, cls=cls_name, pool=cls.pool, mail_from=mail_from,
                rcpts=[r.address for r in rcpts], own=src_type in ("dsn", "postmaster"))
        content = b"".join((signature, join_fields(stamp + kept), b"\r\n", body))
        body.release()
        msg = Message(
            id=qid, cls=cls_name, pool=cls.pool, queued_at=now,
            mail_from=envelope_sender(self.config.pools[cls.pool], mail_from),
            deadline=now + (cls.sla if cls.sla is not None else cls.expiry),
            expire_at=now + cls.expiry, priority=cls.priority, size=len(content), envid=envid,
            ret=ret, correlation_id=correlation or envid, message_id=message_id,
            listener=listener, auth_user=auth_user, client=client_ip, smtputf8=smtputf8)
        recipients = [Recipient(msg=msg, idx=i, address=r.address, domain=domain_of(r.address),
                                orcpt=r.orcpt, notify=r.notify) for i, r in enumerate(rcpts)]
        msg.remaining = len(recipients)
        src_mta = f"{client_name} ({client_ip})" if client_ip else ""
        received = [Record(type="r", time_logged=now, time_queued=now, orig=mail_from,
                           rcpt=r.address, queue_id=qid, cls=cls_name, vmta_pool=cls.pool,
                           orcpt=r.orcpt, src_type=src_type, dsn_diag=dkim_note, src_mta=src_mta,
                           dlv_size=msg.size, job_id=msg.correlation_id, env_id=envid,
                           correlation_id=msg.correlation_id, message_id=message_id,
                           listener=listener, auth_user=auth_user) for r in recipients]
        # the "r" (and "s") records are committed with the message: no 250 without them
        await self.store(msg, recipients, content, urgent=cls.sla is not None,
                         events=dropped + received, finals=finals)
        return qid

    async def store(self, msg: Message, recipients: list[Recipient], content: bytes, *,
                    urgent: bool, events: list[Record],
                    finals: Sequence[tuple[RecipientUpdate, Record]] = ()) -> None:
        """Commit an accepted message with its records, tell the observers, queue it and
        count it: the end of ``submit``, and what the main process does with a message an
        intake worker accepted. Raises Rejection (451) when the spool cannot take it.
        ``finals``: other recipients' final states and records, in the same commit (their
        observers were told when they became final)."""
        try:
            await self.spool.enqueue(msg, recipients, content, urgent=urgent,
                                     events=[*events, *(r for _, r in finals)],
                                     finals=[u for u, _ in finals])
        except SpoolUnavailable:  # told once by the spool (Health), counted here
            self.health.count(self.spool.HEALTH_KEY)
            text = "4.3.0 Temporary failure storing the message, try again"
            raise Rejection(451, text) from None
        for rec in events:
            self.record(rec)
        self.scheduler.add_message(recipients)
        self.accepted += 1


def _refuse_repeated_fields(fields: list[tuple[str, bytes]]) -> None:
    """Two Subject (or From, Date, To ...) fields are read differently by different programs
    (OpenDKIM cannot even parse them, a DKIM signature covers one of them)."""
    for name in SINGLE_FIELDS:
        count = sum(1 for n, _ in fields if n == name)
        if count > 1:
            raise Rejection(550, f"5.6.0 message has {count} {name} header fields; RFC 5322"
                                 " section 3.6 allows one")
