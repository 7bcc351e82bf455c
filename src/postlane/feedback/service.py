"""The feedback loop of one node: what it learns from replies, bounces, complaints and
unsubscribes, and how that stops mail that should not be sent.

The rest of the node calls in at four hooks (all optional, so the core runs without them):
intake (``at_rcpt`` at RCPT, ``screen`` after classification), relay (``envelope_sender``),
the listeners (``is_report_address`` / ``receive`` for bounces and ARF reports) and the
accounting log (``on_record``: hard bounces suppress, deliveries and complaints feed the rates).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Container, Mapping
from email import message_from_bytes
from typing import Any, Protocol, TypeVar, cast

from ..accounting.records import Record, pack
from ..address import address_key, domain_key
from ..config import Config
from ..config.model import ClassFeedbackConfig
from ..policy.intake import RcptIn
from ..spool import Message, Recipient, local_dir
from .categories import ADDRESS_FAILURES, Classifier, load_classifier
from .complaints import ComplaintRates
from .keys import load_or_create_key
from .parse import Report, parse_report
from .suppression import SCOPES, Entry, SuppressionError, SuppressionList, adding, normalize
from .suppression_writer import SuppressionWriter
from .unsubscribe import TokenError, UnsubscribeSigner
from .verp import VERP, VerpAddress

__all__ = ["DMARCReports", "FeedbackService"]


def _mailbox(address: str) -> str:
    """An address as reports are matched to recipients: case-insensitive, the domain in
    A-labels (a report from a server without SMTPUTF8 names ``anna@xn--exmple-cua.com``, the
    recipient was ``anna@exämple.com``), the local part in NFC (``address_key``)."""
    return address_key(address)

log = logging.getLogger("postlane.feedback")
ORIGIN_WAIT = 2.0
"""Seconds a report waits for the audit store to name its message's pool and class."""

#: ARF feedback types that are the recipient asking to stop (auth-failure reports are not).
_COMPLAINTS = frozenset({"abuse", "fraud", "virus", "opt-out", "other"})
#: What a delivery status report may say of a recipient, and the node records.
_REPORTED = ("failed", "delayed", "delivered", "relayed", "expanded")
_REPORTS_KEPT = 100_000
"""Reports remembered to tell a resent one from a new one (16 bytes and a slot each)."""
_DEFAULT_POLICY = ClassFeedbackConfig()
_TOKEN = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")


def _one_line(text: str, limit: int = 200) -> str:
    return "".join(ch if 32 <= ord(ch) < 127 else " " for ch in text)[:limit].strip()


class DMARCReports(Protocol):
    """Where mail to the DMARC ``rua`` addresses goes (the reputation service, a layer above:
    this port is how it is handed in)."""

    def is_rua(self, address: str) -> bool: ...

    async def receive(self, data: bytes, client: str = "") -> Any: ...


CHANGE_MARGIN = 60.0
"""Seconds after a change of the suppression list during which newly queued mail is still
looked up at delivery: its RCPT may have been checked before the change (DATA takes time),
and another process's change is seen up to a second late."""


_T = TypeVar("_T")


async def _per_message(qids: list[str], fetch: Callable[[str], Awaitable[_T]],
                       warning: str) -> dict[str, _T]:
    """``fetch`` of each queue id once, each within ``ORIGIN_WAIT``; one that fails or is
    slow is logged (``warning`` with the queue id and the error's name) and left out: the
    report is acted on all the same."""
    found: dict[str, _T] = {}
    for qid in dict.fromkeys(qids):
        try:
            found[qid] = await asyncio.wait_for(fetch(qid), ORIGIN_WAIT)
        except Exception as exc:  # noqa: BLE001 - the report is still acted on
            log.warning(warning, qid, type(exc).__name__)
    return found


class FeedbackService:
    def __init__(self, config: Config, record: Callable[[Record], None], *,
                 rates: ComplaintRates | None = None, dmarc: DMARCReports | None = None,
                 origin: Callable[[str], Awaitable[dict | None]] | None = None,
                 reported: Callable[[str], Awaitable[set[tuple[str, str]]]] | None = None,
                 sent_as: Callable[[str, list[str]], Awaitable[list[dict]]] | None = None
                 ) -> None:
        self.config = config
        self.origin = origin
        """The "r" record of a queue id (the audit store's): the pool, class and sender of
        the message a report names, which its bounce domain alone does not tell (pools may
        share one)."""
        self.reported = reported
        """(recipient, action) of the "rb", "rd" and "f" records of a queue id on the record
        already (the spool's outbox and the store): a report sent again to another node of
        a cluster, or to this node after a restart, is not recorded twice."""
        self.sent_as = sent_as
        """The "r" records of a Message-ID (to these recipients first), oldest first (the
        outbox's and the store's): the message a complaint without our VERP names, under
        whose queue id ``reported`` looks for a copy recorded already."""
        fb = config.feedback
        spool = local_dir(config)
        self.classifier = load_classifier(fb.bounce_rules)
        """Reply -> bounce category; replaced by a reload (``use_classifier``)."""
        self.suppression = SuppressionList(fb.suppression_db or spool / "suppression.sqlite3")
        self.writes = SuppressionWriter(self.suppression, log)
        """Every write of the node to the list goes through this thread, never the loop."""
        key = load_or_create_key(fb.key_file or spool / "feedback.key")
        self.key_id = hashlib.sha256(b"postlane feedback key\0" + key).hexdigest()[:16]
        """Names the key without revealing it: every node of a cluster must have the same."""
        self.verp = VERP(key)
        self.signer = UnsubscribeSigner(key, fb.unsubscribe_ttl)
        self.rates = rates if rates is not None else ComplaintRates.for_config(fb)
        """Complaint rates per pool and domain (the reputation view reads the same object)."""
        self.bounce_domains = {p.bounce_domain.lower(): name for name, p in config.pools.items()
                               if p.bounce_domain}
        self.fbl_addresses = {a.lower() for a in fb.fbl_addresses}
        self.mailto = (fb.unsubscribe_mailto or "").lower() or None
        self.record = record
        self._started = time.time()
        self._version = self.suppression.data_version()
        self._changed = 0.0
        """When the list was last seen to change (0: not since the start)."""
        self._next_look = 0.0
        self._written = 0
        """The writer's count of writes when the list was last looked at."""
        self._reported: dict[bytes, None] = {}
        """Reports recorded since the start (``_seen``), oldest first."""
        self.dmarc = dmarc
        """The reputation service when the node has one: mail to the DMARC ``rua`` addresses
        goes there."""

    def classify(self, status: str, reply: str = "") -> str:
        """A reply's bounce category by the rules in force (the scheduler's "b" and "t"
        records use this, so a reload's new rules reach them too)."""
        return self.classifier.classify(status, reply)

    def use_classifier(self, classifier: Classifier) -> None:
        """Categorize with ``classifier`` from now on (a reload's bounce rules, loaded
        beforehand): reports parsed from here on and ``classify``."""
        self.classifier = classifier

    def close(self) -> None:
        """Write what is queued, then close the list (blocks: call it in a thread)."""
        self.writes.close()
        self.suppression.close()

    async def flush(self) -> None:
        """Wait until the suppressions of every record so far are written."""
        await self.writes.flush()

    def policy(self, cls: str | None) -> ClassFeedbackConfig:
        return self.config.feedback.classes.get(cls or "", _DEFAULT_POLICY)

    def scopes(self, cls: str) -> tuple[str, ...]:
        """The suppression scopes that stop mail of class ``cls``."""
        best_effort = self.config.classes[cls].sla is None
        return tuple(s for s in SCOPES if s == "all" or (s == "best-effort" and best_effort)
                     or (s == "marketing" and self.policy(cls).marketing))

    # -- intake ---------------------------------------------------------------------------------

    def at_rcpt(self, address: str, default_class: str | None) -> tuple[str | None, Entry | None]:
        """Look a recipient up once, in every scope, at RCPT: the 550 for a recipient
        suppressed for every class (none if the class this listener will most likely assign
        drops suppressed recipients instead), and the entry to hand on with the recipient to
        ``screen``, which decides marketing-only suppressions once the class is known (its
        header comes with DATA). One query per message instead of two: SQLite releases the
        GIL, and each release can hand the event loop's turn to the spool writer."""
        hit = self.suppression.check_one(address)
        if hit is None or hit.scope != "all" or self.policy(
                default_class or self.config.default_class).suppressed == "drop":
            return None, hit
        return (f"550 5.7.1 Recipient suppressed ({hit.why()}):"
                f" {_one_line(hit.reason or hit.source)}", hit)

    def screen(self, *, queue_id: str, now: float, cls: str, pool: str, mail_from: str,
               rcpts: list[RcptIn], fields: list[tuple[str, bytes]], message_id: str,
               listener: str) -> tuple[list[RcptIn], list[tuple[str, bytes]], list[Record]]:
        """Drop suppressed recipients and return the rest, the header fields to add
        (List-Unsubscribe for a marketing class) and an "s" record per dropped recipient (the
        caller commits them with the message). Recipients looked up at RCPT (``at_rcpt``) are
        not looked up again."""
        policy = self.policy(cls)
        scopes = self.scopes(cls)
        # not looked up at RCPT, or found there in a scope that does not stop this class (the
        # address may have another entry that does)
        found = {id(r): cast("Entry | None", r.suppressed) for r in rcpts}  # see RcptIn
        ask = [r.address for r in rcpts if not r.checked or (
            (e := found[id(r)]) is not None and e.scope not in scopes)]
        hits = self.suppression.check(ask, scopes) if ask else {}
        kept = []
        dropped: list[Record] = []
        for rcpt in rcpts:
            hit = found[id(rcpt)] if rcpt.checked else None
            if hit is None or hit.scope not in scopes:
                hit = hits.get(rcpt.address)
            if hit is None:
                kept.append(rcpt)
                continue
            dropped.append(Record(
                type="s", time_logged=now, time_queued=now, orig=mail_from, rcpt=rcpt.address,
                queue_id=queue_id, cls=cls, vmta_pool=pool, orcpt=rcpt.orcpt,
                dsn_action="failed", dsn_status="5.7.1",
                dsn_diag=f"suppressed ({hit.why()}): {_one_line(hit.reason)}",
                message_id=message_id, listener=listener))
        added: list[tuple[str, bytes]] = []
        url = self.config.feedback.unsubscribe_url
        if policy.marketing and url and len(kept) == 1 and not any(
                name == "list-unsubscribe" for name, _ in fields):
            for raw in self.signer.header_fields(kept[0].address, url,
                                                 self.config.feedback.unsubscribe_mailto):
                added.append((raw.split(b":", 1)[0].decode().lower(), raw))
        return kept, added, dropped

    # -- delivery -------------------------------------------------------------------------------

    def at_delivery(self, rcpt: Recipient) -> tuple[str, str] | None:
        """(scope, reason) when the list now stops ``rcpt``, which intake let through: the
        entry came while the message was queued (a complaint or an unsubscribe while a
        campaign waited, a hard bounce of another message). Looked up only for messages queued
        before this node started or around a change of the list, so mail that intake checked
        against the list as it is costs nothing more. Bounces (``<>``) are not screened, as
        at intake."""
        msg = rcpt.msg
        if not msg.mail_from or not self._maybe_changed_since(msg.queued_at):
            return None
        scopes = self.scopes(msg.cls) if msg.cls in self.config.classes else ("all",)
        hit = self.suppression.check((rcpt.address,), scopes).get(rcpt.address)
        if hit is None:
            return None
        return hit.scope, f"suppressed ({hit.why()}): {_one_line(hit.reason)}"

    def _maybe_changed_since(self, queued_at: float) -> bool:
        """Whether the list may hold an entry that intake did not see for mail queued then
        (this node's own writes - the API's, a complaint's, a bounce's, the cluster's sync -
        are noticed as soon as committed, another process's (the CLI's) within a second: one
        ``data_version`` look a second at most, and one after each write of the node)."""
        now = time.monotonic()
        written = self.writes.written
        if now >= self._next_look or written != self._written:
            self._next_look, self._written = now + 1.0, written
            version = self.suppression.data_version()
            if version != self._version:
                self._version, self._changed = version, time.time()
        return queued_at < self._started or queued_at < self._changed + CHANGE_MARGIN

    # -- relay ----------------------------------------------------------------------------------

    def envelope_sender(self, msg: Message, rcpt: Recipient) -> str:
        """The VERP return path on the pool's bounce domain (a bounce keeps ``<>``)."""
        domain = self.config.pools[msg.pool].bounce_domain if msg.pool in self.config.pools \
            else None
        if not domain or not msg.mail_from:
            return msg.mail_from
        return self.verp.encode(msg.id, rcpt.idx, rcpt.address, domain)

    # -- inbound reports ------------------------------------------------------------------------

    def report_domains(self) -> set[str]:
        """The domains whose mail this node takes itself: its bounce domains and those of its
        FBL and unsubscribe addresses (postmaster@ each is the postmaster's, RFC 5321 4.5.1)."""
        return set(self.bounce_domains) | {a.rpartition("@")[2] for a in self.fbl_addresses} | (
            {self.mailto.rpartition("@")[2]} if self.mailto else set())

    def is_report_address(self, address: str) -> bool:
        address = address.lower()
        return address in self.fbl_addresses or address == self.mailto or \
            address.rpartition("@")[2] in self.bounce_domains or \
            (self.dmarc is not None and self.dmarc.is_rua(address))

    async def receive(self, data: bytes, rcpts: list[str], client: str = "") -> Report | None:
        """Act on a report received for ``rcpts`` (our VERP, FBL, unsubscribe or DMARC
        addresses): "rb" records for failed recipients, "rd" for delivery reports, "f" records
        for complaints, suppressions; DMARC aggregate reports go to the reputation store."""
        if self.dmarc is not None and any(self.dmarc.is_rua(r) for r in rcpts):
            await self.dmarc.receive(data, client)
            rcpts = [r for r in rcpts if not self.dmarc.is_rua(r)]
            if not rcpts:
                return None
        report = await asyncio.to_thread(parse_report, data, self.classifier)
        held: list[Record] = []
        if self.mailto is not None and self.mailto in (r.lower() for r in rcpts):
            self._unsubscribe_by_mail(data, held.append)
            rcpts = [r for r in rcpts if r.lower() != self.mailto]
            if not rcpts:
                await self._then_record(held)
                return report
        verps = self._verps(report, rcpts)
        sent = await self._complained_of(report, verps)
        qids = [*(v.queue_id for v in verps), *(row["queue_id"] for row in sent.values())]
        known = await self._recorded(qids)
        origins = await self._origins([v.queue_id for v in verps])
        origins.update((row["queue_id"], row) for row in sent.values())
        self.act_on(report, rcpts, verps, client, origins, held.append, known,
                    {address: row["queue_id"] for address, row in sent.items()})
        await self._then_record(held)
        return report

    async def _then_record(self, held: list[Record]) -> None:
        """The report's entries written, then its records handed to the spool (the caller
        commits them before the answer), then the writes those call for (a hard bounce's
        evidence). In that order a node killed before the answer has, at worst, the entries
        in force without their records: the sender, unanswered, sends the report again and
        it is on the record once. Records first, the spool could commit them with other
        mail's while the list waited (a CLI import's lock), and the resent report recorded
        the complaint twice."""
        await self.writes.flush()
        for rec in held:
            self.record(rec)
        if held:
            await self.writes.flush()

    def _unsubscribe_by_mail(self, data: bytes, record: Callable[[Record], None]) -> None:
        """The List-Unsubscribe mailto: the subject carries the same signed token as the URL
        (a mail without a valid token unsubscribes nobody: anyone can send mail)."""
        subject = str(message_from_bytes(data).get("Subject", ""))
        for token in _TOKEN.findall(subject):
            try:
                address = self.signer.verify(token)
            except TokenError:
                continue
            self._suppress(address, "marketing", "unsubscribe (mailto)", "unsubscribe")
            record(_unsubscribed(address, "mailto"))
            return
        log.warning("unsubscribe mail without a valid token ignored")

    def _verps(self, report: Report, rcpts: list[str]) -> list[VerpAddress]:
        """The valid VERP addresses a report came to or names, one per recipient."""
        ours = [*rcpts, *report.to, report.original_return_path]
        return list({v.recipient.lower(): v for v in map(self.verp.decode, ours) if v}.values())

    async def _complained_of(self, report: Report, verps: list[VerpAddress]
                             ) -> dict[str, dict]:
        """Complained-of address -> the "r" record of the message a complaint without our
        VERP names by its Message-ID (``sent_as``): that address's, else the oldest message's
        (the same on every node and after a restart, where a copy of the report is looked
        for). Empty for a VERP complaint, a bounce, or a store that is away or slow
        (``ORIGIN_WAIT``): then only this node's memory tells a copy."""
        mid = report.original_message_id
        named = list(dict.fromkeys(r.address.lower() for r in report.recipients))
        if (report.kind != "complaint" or report.complaint is None or verps or not mid
                or not named or self.sent_as is None):
            return {}
        try:
            rows = await asyncio.wait_for(self.sent_as(mid, named), ORIGIN_WAIT)
        except Exception as exc:  # noqa: BLE001 - the report is still acted on
            log.warning("the spool and the audit store could not tell which message a"
                        " complaint names (%s): a copy recorded before may be recorded again",
                        type(exc).__name__, extra={"message_id": _one_line(mid, 100)})
            return {}
        if not rows:
            return {}
        return {address: next((row for row in rows if (row["rcpt"] or "").lower() == address),
                              rows[0]) for address in named}

    async def _origins(self, qids: list[str]) -> dict[str, dict]:
        """The "r" records of the messages ``qids`` (``origin``); a store that is away
        or slow (``ORIGIN_WAIT``) leaves the records to the bounce domain's pool."""
        if self.origin is None:
            return {}
        rows = await _per_message(qids, self.origin, "the audit store could not tell queue id"
                                  " %s's pool and class (%s): its feedback record has the"
                                  " bounce domain's pool")
        return {qid: row for qid, row in rows.items() if row is not None}

    async def _recorded(self, qids: list[str]) -> set[tuple[str, str, str]]:
        """(queue id, recipient, action or feedback type) of the final reports and
        complaints of the messages ``qids`` (a report's VERPs', a complaint's Message-ID's)
        that are on the record already (``reported``). A store that is away or slow
        (``ORIGIN_WAIT``) leaves only this node's memory to tell a report sent again."""
        if self.reported is None:
            return set()
        found = await _per_message(qids, self.reported, "the spool and the audit store could"
                                   " not tell whether queue id %s's report is on the record"
                                   " already (%s): a copy another node recorded may be"
                                   " recorded again")
        return {(qid, rcpt, action) for qid, pairs in found.items() for rcpt, action in pairs}
        for qid in dict.fromkeys(qids):
            try:
                pairs = await asyncio.wait_for(self.reported(qid), ORIGIN_WAIT)
            except Exception as exc:  # noqa: BLE001 - the report is still acted on
                log.warning("the spool and the audit store could not tell whether queue id"
                            " %s's report is on the record already (%s): a copy another node"
                            " recorded may be recorded again", qid, type(exc).__name__)
                continue
            found.update((qid, rcpt, action) for rcpt, action in pairs)
        return found

    def act_on(self, report: Report, rcpts: list[str], verps: list[VerpAddress],
               client: str = "", origins: Mapping[str, dict] | None = None,
               record: Callable[[Record], None] | None = None,
               known: Container[tuple[str, str, str]] = (),
               sent: Mapping[str, str] | None = None) -> None:
        """``verps``: ``_verps`` of the report; ``origins``: the "r" record of each queue id
        the report names, where known; ``record``: where its records go (``self.record``
        by default; ``receive`` holds them until the entries are written); ``known``: the
        final reports on the record already (``_recorded``); ``sent``: complained-of
        address -> queue id of the message a complaint without VERP names by Message-ID
        (``_complained_of``)."""
        record = record or self.record
        now = time.time()
        ours = [*rcpts, *report.to, report.original_return_path]
        pool = next((self.bounce_domains[a.rpartition("@")[2].lower()] for a in ours
                     if a.rpartition("@")[2].lower() in self.bounce_domains), "")
        common: dict[str, Any] = {"time_logged": now, "time_queued": now, "orig": "", "cls": "",
                                  "vmta_pool": pool, "src_type": "feedback", "src_mta": client,
                                  "message_id": report.original_message_id}

        def of(qid: str) -> dict[str, Any]:
            """The fields of a record about ``qid``: its message's, where the store knows."""
            row = (origins or {}).get(qid)
            if row is None:
                return common
            return {**common, "vmta_pool": row["vmta_pool"] or pool, "cls": row["cls"] or "",
                    "orig": row["orig"] or "", "time_queued": row["time_queued"] or now,
                    "message_id": common["message_id"] or row["message_id"] or ""}

        base = of(verps[0].queue_id) if verps else common
        if report.kind == "complaint" and report.complaint is not None:
            ftype = report.complaint.feedback_type
            targets = [v.recipient for v in verps] or [r.address for r in report.recipients]
            for address in dict.fromkeys(t.lower() for t in targets):
                qid = verps[0].queue_id if verps else (sent or {}).get(address, "")
                about = verps[0].queue_id if verps else report.original_message_id
                try:
                    normalize(address)
                except SuppressionError:  # 255 octets and more: no recipient was ever that
                    log.warning("complaint names no possible address: that name ignored",
                                extra={"address": _one_line(address, 80), "type": ftype})
                    continue
                if about and ((qid, address, ftype) in known
                              or self._seen("f", address, ftype, about)):
                    log.info("complaint already recorded: not counted again",
                             extra={"type": ftype, "message_id": _one_line(about, 100)})
                    continue
                record(Record(type="f", rcpt=address, queue_id=qid,
                              dsn_diag=f"arf;{ftype}", dsn_action=ftype,
                              **(base if verps or not qid else of(qid))))
                if ftype in _COMPLAINTS:
                    self._suppress(address, "marketing", f"complaint ({ftype})", "complaint")
            log.info("complaint", extra={"type": ftype, "recipients": len(targets)})
            return
        if report.kind not in ("bounce", "delay", "delivered"):
            log.info("report ignored", extra={"kind": report.kind, "to": rcpts})
            return
        # a bounce names failed recipients; a delay DSN (NOTIFY=DELAY or none: the receiving
        # side still holds the message after it took it) delayed ones; a success DSN
        # (NOTIFY=SUCCESS, passed on when the mail was relayed) delivered, relayed or
        # expanded ones
        wanted = {"bounce": ("failed",), "delay": ("delayed",)}.get(
            report.kind, ("delivered", "relayed", "expanded"))
        named = [r for r in report.recipients if r.action in wanted]
        if not verps:  # anyone can send a DSN: without our signature it proves nothing
            what = {"bounce": "bounce", "delay": "delay report"}.get(report.kind,
                                                                     "delivery report")
            log.warning(f"{what} without a valid VERP address ignored",
                        extra={"to": rcpts, "named": [r.address for r in named][:10]})
            return
        for verp in verps:  # the VERP names the recipient for certain; the text may not
            # a report that names the recipient says what became of it, whatever it says of
            # others (delayed here, another address failed: not a hard bounce of ours)
            mailbox = _mailbox(verp.recipient)
            match = next((r for r in report.recipients if r.action in _REPORTED
                          and _mailbox(r.address) == mailbox),
                         named[0] if len(named) == 1 else None)
            if match is None:
                continue
            # a final outcome is reported once per message and recipient; a receiver may
            # warn of a delay again and again
            if match.action != "delayed" and (
                    (verp.queue_id, verp.recipient.lower(), match.action) in known
                    or self._seen("r", verp.queue_id, str(verp.index), match.action)):
                log.info("delivery status report already recorded: not counted again",
                         extra={"queue_id": verp.queue_id, "action": match.action})
                continue
            record(Record(type="rb" if match.action == "failed" else "rd",
                          rcpt=verp.recipient, queue_id=verp.queue_id,
                          dsn_action=match.action, dsn_status=match.status,
                          dsn_diag=match.diagnostic or f"{report.method};",
                          dsn_mta=f"dns;{match.remote_mta}" if match.remote_mta else "",
                          bounce_cat=match.category if match.action == "failed" else "",
                          **of(verp.queue_id)))

    # -- unsubscribe ----------------------------------------------------------------------------

    async def unsubscribe_now(self, address: str, how: str,
                              flush: Callable[[], Awaitable[None]]) -> None:
        """An unsubscribe answered over HTTP (one-click: the provider does not ask again
        after its 200): the entry and its "f" record committed together in the list, then
        the record in the spool (``flush``), before the caller answers; a node killed in
        between writes the record at its next start (``Operations.record_pending``)."""
        entry = SuppressionList.entry(address, "marketing", f"unsubscribe ({how})",
                                      "unsubscribe")
        rec = _unsubscribed(address, how)
        _, pending = await self.writes.call(self.suppression.recorded, adding([entry]),
                                            lambda n: pack(rec))
        self.record(rec)
        await flush()
        if pending is not None:
            await self.writes.call(self.suppression.settle, (pending,))

    # -- accounting listener --------------------------------------------------------------------

    def on_record(self, rec: Record) -> None:
        """Hard bounces suppress (``hard_bounce``); deliveries and complaints feed the
        rates."""
        if rec.type == "d":
            # in A-labels: exämple.com and xn--exmple-cua.com are one domain's rate
            self.rates.on_delivered(rec.vmta_pool, domain_key(rec.rcpt.rpartition("@")[2]))
        elif rec.type in ("b", "rb") and rec.dsn_status.startswith("5") and \
                rec.bounce_cat in ADDRESS_FAILURES:
            self.hard_bounce(rec)
        elif rec.type == "f" and rec.dsn_action in _COMPLAINTS - {"opt-out"}:
            self.rates.on_complaint(rec.vmta_pool, domain_key(rec.rcpt.rpartition("@")[2]))

    def hard_bounce(self, rec: Record) -> None:
        """An address-level hard bounce: the address stops classes without an SLA at once, and
        every class once ``suppress_after`` bounces arrived within ``window``; either lapses
        after ``expiry``. One reply is not enough to stop a regulated notice."""
        policy = self.config.feedback.bounces
        detail = _one_line(f"{rec.bounce_cat}: {rec.dsn_diag}", 300)
        expires = rec.time_logged + policy.expiry if policy.expiry else 0.0

        def entry(count: int) -> Entry:
            if count >= policy.suppress_after:
                return SuppressionList.entry(
                    rec.rcpt, "all", f"{count} hard bounces within {_days(policy.window)},"
                    f" last {detail}", "bounce", rec.time_logged, expires)
            return SuppressionList.entry(
                rec.rcpt, "best-effort", f"hard bounce {count} of {policy.suppress_after}:"
                f" {detail}", "bounce", rec.time_logged, expires)

        self.writes.submit(self.suppression.bounced, rec.rcpt, rec.time_logged, policy.window,
                           detail, entry, rec.queue_id)

    def _seen(self, *what: str) -> bool:
        """Whether this report (a complaint: recipient, type, reported message; a bounce or
        delivery report: queue id, recipient index, action) was recorded already since the
        start: a sender that missed our 250 sends the same report again, and each copy was a
        record, a complaint in the complaint rate, a bounce in the bounce rate. The last
        ``_REPORTS_KEPT`` are remembered."""
        key = hashlib.blake2b("\0".join(what).encode(), digest_size=16).digest()
        if key in self._reported:
            return True
        self._reported[key] = None
        if len(self._reported) > _REPORTS_KEPT:
            del self._reported[next(iter(self._reported))]
        return False

    def _suppress(self, address: str, scope: str, reason: str, source: str) -> None:
        """Add an entry in the writer thread (a bad address raises here, at once)."""
        self.writes.submit(self.suppression.add_many,
                           [SuppressionList.entry(address, scope, reason, source)])


def _unsubscribed(address: str, how: str) -> Record:
    now = time.time()
    return Record(type="f", time_logged=now, time_queued=now, orig="", rcpt=address,
                  queue_id="", cls="", vmta_pool="", dsn_action="unsubscribe",
                  dsn_diag=f"unsubscribe;{how}", src_type="feedback")


def _days(seconds: float) -> str:
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds:g}s"
