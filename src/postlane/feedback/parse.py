"""What a received report says: bounce, delay, complaint, auto-reply or nothing at all.

RFC 3464 DSNs are read field by field with the stdlib email package. Many MTAs (qmail, older
Exim, Exchange, mobile carriers ...) still send prose, so a fallback reads the human-readable part:
the failed recipient is an address in that text that is not the bounce's own sender/recipient,
and its status is the enhanced code or SMTP reply code written next to it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from email import message_from_bytes, message_from_string
from email.message import Message
from email.utils import getaddresses
from typing import Any

from .arf import (
    QUOTED_ADDR,
    Complaint,
    bare_address,
    field_text,
    message_body,
    parse_arf,
    returned_message,
)
from .categories import Classifier, default_classifier

log = logging.getLogger("postlane.feedback")

__all__ = ["Report", "ReportRecipient", "parse_report"]

_ADDR = re.compile(r"(?<![A-Za-z0-9._%+=-])[A-Za-z0-9._%+=!#$&'*/?^`{|}~-]+@"
                   r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![A-Za-z0-9-])")
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_REPLY = re.compile(r"(?<![\d.-])([245])\d\d(?=[ -]|$)", re.MULTILINE)
_DAEMON = re.compile(r"mailer-daemon|post_?master|mail delivery|mail administrator|"
                     r"maildelivery|bounce|mailer|daemon|nobody|noreply|no-reply|"
                     r"mdaemon|root@", re.IGNORECASE)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|delivery (status|fail|notification|problem|report)|returned mail|"
    r"failure notice|mail delivery|non.?deliver|could not be delivered|delivery has failed|"
    r"returned to sender|not delivered|delivery failure|failed delivery|mail system error|"
    r"rejected|bounce|warning: could not send|delayed mail|delivery delayed|nondeliverable|"
    r"permanent error|message (status|not delivered)|problem delivering|error sending|"
    r"mail failed|delivery error|delivery notification|unzustellbar|no se puede entregar|"
    r"non remis|erreur|fehlgeschlagen|returned message", re.IGNORECASE)
_AUTO_SUBJECT = re.compile(r"^(auto(matic)?[ -]?(reply|response|answer)|out of (the )?office|"
                           r"away|vacation|abwesen|absence|auto:)", re.IGNORECASE)
_ORIGINAL_MARK = re.compile(
    r"^\s*(-{2,}.{0,40}(original message|copy of (the )?message|message (text|headers) follow|"
    r"below this line|undelivered message|returned message|original mail|headers of|"
    r"include(s|d)? (all )?the headers)|"
    r"-{3,} ?(original message|below this line)|"
    r"original message follows|"
    r"below is a copy of the (original )?message|"
    r"-+ ?the header of the original message|"
    r"-+ ?message header follows|"
    r"\*{3,} ?original message|"
    r"return-path: ?<|received: from )",
    re.IGNORECASE | re.MULTILINE)
_TEMPORARY = re.compile(
    r"temporar|will (be )?(retr|continue|try again)|still trying|retry|not yet been delivered|"
    r"\bdelay|will keep trying|warning|has not been delivered yet|deferred|try again later",
    re.IGNORECASE)
_ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
_RAW_DSN = re.compile(r"^(?:final|original)-recipient:\s*rfc822;\s*<?([^\s<>]+@[^\s<>]+?)>?\s*$",
                      re.IGNORECASE | re.MULTILINE)
_STRONG = re.compile(r"^\s*<([^\s<>@]+@[^\s<>@]+)>:?\s*$|rcpt to:\s*<?([^\s<>@]+@[^\s<>@]+?)>?\s*$|"
                     r"error delivering your mail to <([^\s<>@]+@[^\s<>@]+)>",
                     re.IGNORECASE | re.MULTILINE)
_SKIP_LOCAL = re.compile(r"^(mailer-daemon|postmaster|daemon|abuse|root|noreply|no-reply)$",
                         re.IGNORECASE)
_UNI_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
_HEXDIGIT = re.compile(r"[0-9a-f]", re.IGNORECASE)


def _looks_like_id(local: str) -> bool:
    """Message-IDs and queue ids in bounce prose look like addresses: 14a3e1b4b5a.10b1a4c5@..."""
    return ("." in local or "-" in local) and len(_HEXDIGIT.findall(local)) >= 10 and sum(
        ch.isdigit() for ch in local) >= 6


@dataclass
class ReportRecipient:
    address: str
    action: str  # failed | delayed | delivered | relayed | expanded | complained | auto-replied
    status: str = ""  # RFC 3463, e.g. "5.1.1"
    permanent: bool | None = None  # None: not a failure
    category: str = ""
    diagnostic: str = ""
    remote_mta: str = ""

    def as_dict(self) -> dict:
        return {"address": self.address, "action": self.action, "status": self.status,
                "permanent": self.permanent, "category": self.category,
                "diagnostic": self.diagnostic, "remote_mta": self.remote_mta}


@dataclass
class Report:
    kind: str  # bounce | delay | delivered | complaint | auto-reply | not-a-report
    recipients: list[ReportRecipient] = field(default_factory=list)
    method: str = ""  # dsn | heuristic | arf | ...
    to: list[str] = field(default_factory=list)  # where the report was sent (our VERP address)
    original_message_id: str = ""
    original_return_path: str = ""
    complaint: Complaint | None = None

    def as_dict(self) -> dict:
        out: dict = {"kind": self.kind, "method": self.method, "to": self.to,
                     "original_message_id": self.original_message_id,
                     "original_return_path": self.original_return_path,
                     "recipients": [r.as_dict() for r in self.recipients]}
        if self.complaint is not None:
            out["complaint"] = self.complaint.as_dict()
        return out


def _text_of(part: Message) -> str:
    raw = part.get_payload(decode=True)  # bytes, or None for a multipart
    if not isinstance(raw, bytes):
        payload = part.get_payload()
        return payload if isinstance(payload, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return raw.decode(charset, "replace")
    except LookupError:
        return raw.decode("utf-8", "replace")


def _status_of(text: str) -> str:
    found = _ENHANCED.search(text)
    if found:
        return found.group(0)
    reply = _REPLY.search(text)
    return f"{reply.group(1)}.0.0" if reply else ""


def _recipient(value: str) -> str:
    """A Final-/Original-Recipient value; ``utf-8`` addresses (RFC 6533) may be non-ASCII and
    carry ``\\x{HEX}`` escapes, which the ASCII address pattern would cut apart."""
    kind, sep, rest = value.partition(";")
    if sep and kind.strip().lower() == "utf-8":
        addr = _UNI_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), rest).strip().strip("<>")
        local, at, domain = addr.rpartition("@")
        if at and local and domain and not any(ch.isspace() for ch in addr):
            return f"{local}@{domain.lower()}"
    quoted = QUOTED_ADDR.search(rest if sep else value)  # "john doe"@x: the pattern cuts it
    if quoted:
        local, _, domain = quoted.group(0).rpartition("@")
        return f"{local}@{domain.lower()}"
    return bare_address(value)


def _said_of(notice: str, address: str) -> str:
    """What the human-readable part says under ``address``: Exim writes no Diagnostic-Code
    for a recipient that failed after it took the message (a router's ``:fail:``, an unknown
    local user, a full mailbox), only ``Status: 5.0.0``, and the reason in its text, indented
    under the address (``  k@example.com\n    5.1.1 mailbox unavailable``)."""
    lines = notice.splitlines()
    for i, line in enumerate(lines):
        at = line.lower().find(address.lower())
        if at < 0:
            continue
        indent = len(line) - len(line.lstrip())
        said = [line[at + len(address):].strip(" \t<>:")]
        for nxt in lines[i + 1:]:
            if not nxt.strip() or len(nxt) - len(nxt.lstrip()) <= indent:
                break
            said.append(nxt)
        return " ".join(" ".join(said).split())[:500]
    return ""


def _dsn(msg: Message, classifier: Classifier) -> list[ReportRecipient] | None:
    parts = [p for p in msg.walk() if p.get_content_type() in (
        "message/delivery-status", "message/global-delivery-status")]
    if not parts:
        return None
    out: list[ReportRecipient] = []
    notice: str | None = None
    for part in parts:
        payload = part.get_payload()
        blocks = payload if isinstance(payload, list) else []
        encoded = message_body(part)  # base64: the email package parsed the encoded text
        text = None
        if encoded is not None:
            text = encoded.decode("utf-8", "replace")
        elif not blocks:
            text = _text_of(part)
        elif part.get_content_type() == "message/global-delivery-status":
            # RFC 6533: the email package parses it as one message, recipients in its body
            text = part.as_bytes().split(b"\n\n", 1)[-1].decode("utf-8", "replace")
        if text is not None:
            blocks = [message_from_string(b)
                      for b in re.split(r"\r?\n\s*\r?\n", text) if b.strip()]
        for block in blocks:
            if not isinstance(block, Message):
                continue
            final = field_text(block.get("Final-Recipient") or block.get("Original-Recipient"))
            address = _recipient(final)
            if not address:
                continue
            action = " ".join(str(block.get("Action", "")).split()).lower().split(" ")[0]
            diag = " ".join(str(block.get("Diagnostic-Code", "")).split())
            if not diag and action in ("failed", "delayed"):
                notice = _notice_text(msg) if notice is None else notice
                diag = _said_of(notice, address)
            status = _ENHANCED.search(str(block.get("Status", "")))
            code = status.group(0) if status else ""
            specific = _ENHANCED.search(diag)  # "Status: 5.0.0" with "550 5.1.1 ..." in the diag
            if specific and (not code or code.endswith(".0.0") and specific.group(1) == code[0]):
                code = specific.group(0)
            code = code or _status_of(diag)
            if action == "expired":  # not RFC 3464 (SendGrid): it gave up retrying
                action, code = "failed", code or "4.4.7"
            elif action == "delayed" and code == "4.4.7":
                # "delivery time expired": OpenSMTPD 6.8 reports the envelope it removed at its
                # queue ttl as "delayed" (its text still says it keeps the message): lost
                action = "failed"
            elif action not in _ACTIONS:
                action = {"4": "delayed", "2": "delivered"}.get(code[:1], "failed")
            if not code:
                code = {"failed": "5.0.0", "delayed": "4.0.0"}.get(action, "2.0.0")
            remote = str(block.get("Remote-MTA", "")).partition(";")[2].strip()
            rr = ReportRecipient(address=address, action=action, status=code, diagnostic=diag,
                                 remote_mta=remote)
            if action in ("failed", "delayed"):
                rr.permanent = code.startswith("5")
                rr.category = classifier.classify(code, diag)
            if all(r.address != address for r in out):
                out.append(rr)
    return out


def _addresses_of(msg: Message, names: tuple[str, ...]) -> set[str]:
    values = [str(v) for n in names for v in (msg.get_all(n) or [])]
    return {addr.lower() for _, addr in getaddresses(values) if "@" in addr}


def _own_addresses(msg: Message, original: Message | None) -> set[str]:
    """Addresses that are not the failed recipient: the bounce's own parties and the original
    sender."""
    own: set[str] = set()
    heads: list[tuple[Message, tuple[str, ...]]] = [
        (msg, ("From", "To", "Cc", "Return-Path", "Reply-To", "Sender", "Errors-To"))]
    if original is not None:
        heads.append((original, ("From", "Return-Path", "Sender", "Reply-To", "Errors-To")))
    for m, names in heads:
        own |= _addresses_of(m, names)
    for part in (msg, original):
        if part is not None:
            mid = str(part.get("Message-ID", "")).strip("<> \t")
            if mid:
                own.add(mid.lower())
    return own


def _notice_text(msg: Message) -> str:
    """The human-readable part of a bounce, cut before the returned message."""
    texts = []
    for part in msg.walk():
        if part.is_multipart() or part.get_content_maintype() == "message":
            continue
        ctype = part.get_content_type()
        if part is msg and ctype.startswith("multipart/"):  # a multipart whose boundary is lost
            ctype = "text/plain"
        if ctype in ("text/plain", "text/html") and not part.get_filename():
            text = _text_of(part)
            if ctype == "text/html":
                text = re.sub(r"<[^>]*>", " ", text).replace("&lt;", "<").replace("&gt;", ">")
            texts.append(text)
            if ctype == "text/plain":
                break
    text = "\n".join(texts)
    cut = _ORIGINAL_MARK.search(text)
    return text[: cut.start()] if cut and cut.start() > 0 else text


def _looks_like_bounce(msg: Message) -> bool:
    sender = str(msg.get("From", ""))
    return bool(_DAEMON.search(sender) or _BOUNCE_SUBJECT.search(str(msg.get("Subject", "")))
                or msg.get("X-Failed-Recipients"))


def _heuristic(msg: Message, classifier: Classifier) -> list[ReportRecipient]:
    original = returned_message(msg)
    own = _own_addresses(msg, original)
    text = _notice_text(msg)
    candidates: list[str] = []
    for value in msg.get_all("X-Failed-Recipients") or []:
        candidates.extend(a for a in (bare_address(v) for v in str(value).split(",")) if a)
    if not candidates:
        whole = "\n".join(_text_of(p) for p in msg.walk() if not p.is_multipart())
        candidates = [bare_address(m.group(1)) for m in _RAW_DSN.finditer(whole)]
    if not candidates:
        senders = own - _addresses_of(msg, ("To", "Cc"))
        for found in _STRONG.finditer(text):
            addr = bare_address(next(g for g in found.groups() if g))
            if addr and addr.lower() not in senders and addr not in candidates:
                candidates.append(addr)
    if not candidates:
        for found in _ADDR.finditer(text):
            addr = found.group(0).strip(".")
            local = addr.rpartition("@")[0]
            before = text[max(0, found.start() - 12): found.start()].lower()
            if addr.lower() in own or _SKIP_LOCAL.match(local) or _looks_like_id(local) or \
                    "from:" in before.replace(
                    " ", "") or "mail from" in before:
                continue
            if addr.lower() not in (c.lower() for c in candidates):
                candidates.append(addr)
    if not candidates and original is not None:
        to = [a for _, a in getaddresses([str(v) for v in original.get_all("To") or []])
              if "@" in a]
        if len(to) == 1:
            candidates.append(bare_address(to[0]))
    out = []
    whole_temp = bool(_TEMPORARY.search(str(msg.get("Subject", "")))) or bool(
        _TEMPORARY.search(text[:600]) and not re.search(r"permanent|fatal", text, re.I))
    for addr in candidates:
        at = text.lower().find(addr.lower())
        near = text[at: at + 600] if at >= 0 else text
        near_lines = near.split("\n\n")[0] if at >= 0 else near
        status = _status_of(near_lines) or _status_of(near) or _status_of(text)
        diag = " ".join(near_lines.split())[:500]
        if not status and classifier.classify("", diag) == "message-expired":
            status = "4.4.7"  # gave up retrying: what the node itself records for expiry
        if not status:
            status = "4.0.0" if whole_temp else "5.0.0"
        permanent = status.startswith("5")
        # 4.4.7: the sender gave up, the message is lost (the node's own expiry is "failed")
        failed = permanent or status == "4.4.7"
        rr = ReportRecipient(address=addr, action="failed" if failed else "delayed",
                             status=status, permanent=permanent, diagnostic=diag,
                             category=classifier.classify(status, diag))
        out.append(rr)
    return out


def _kind(recipients: list[ReportRecipient]) -> str:
    actions = {r.action for r in recipients}
    if "failed" in actions:
        return "bounce"
    if "delayed" in actions:
        return "delay"
    return "delivered" if recipients else "not-a-report"


def parse_report(data: bytes, classifier: Classifier | None = None) -> Report:
    """Everything the node concludes from one received message; one nested too deep for the
    email package (thousands of message/rfc822 parts in each other) is no report."""
    try:
        return _parse_report(data, classifier or default_classifier())
    except RecursionError:
        log.warning("report nested too deep to parse: ignored", extra={"bytes": len(data)})
        return Report(kind="not-a-report")


_SES_STATUS = {"noemail": "1.1", "mailboxfull": "2.2", "messagetoolarge": "3.4"}
"""SES bounce subtypes and the RFC 3463 detail they stand for, when a recipient has no status."""


def _ses_notification(msg: Message, data: bytes) -> dict | None:
    """An Amazon SES notification (``notificationType``, or ``eventType`` for event
    publishing), unwrapped from its SNS envelope: the whole body when it is JSON (an SNS
    webhook's POST) or the text of a one-part mail (SNS to an e-mail subscription)."""
    if data.lstrip()[:1] == b"{":
        text = data.decode("utf-8", "replace")
    elif not msg.is_multipart() and msg.get_content_type() in ("text/plain", "application/json"):
        text = _text_of(msg)
        if text.lstrip()[:1] != "{":
            return None
    else:
        return None
    # strict: a line break in a string (a relay folded a line over 998 octets); raw_decode:
    # SNS's "email" protocol appends an unsubscribe footer after the JSON
    decoder = json.JSONDecoder(strict=False)
    try:
        note = decoder.raw_decode(text.lstrip())[0]
        if isinstance(note, dict) and note.get("Type") == "Notification" and \
                isinstance(note.get("Message"), str):
            note = decoder.raw_decode(note["Message"].lstrip())[0]
    except ValueError:  # not JSON after all: the prose fallback may still read it
        return None
    if not isinstance(note, dict):
        return None
    kind = note.get("notificationType") or note.get("eventType")
    return note if kind in ("Bounce", "Complaint", "Delivery") else None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _ses_report(note: dict, report: Report, classifier: Classifier) -> Report:
    """What an SES notification says: Permanent bounces are hard, Transient (and Undetermined)
    soft: SES gave up, and the message is lost, but the mailbox may take the next one, so the
    status class is 4 whatever SES wrote (its 5.3.4 for a too large message is 4.3.4 here; the
    diagnostic keeps the receiver's words); complaints; deliveries. Everything in it is
    untrusted text: only strings are read, addresses as ARF reads them."""
    kind = note.get("notificationType") or note.get("eventType")
    mail = _dict(note.get("mail"))
    headers = {str(h.get("name", "")).lower(): str(h.get("value", ""))
               for h in _dicts(mail.get("headers"))}
    report.method = "ses-json"
    # SES's "source" is the MAIL FROM it was given: our VERP address when a pool relays
    # through SES, which is what proves the recipient
    report.original_return_path = bare_address(headers.get("return-path", "")) or \
        bare_address(str(mail.get("source") or ""))
    report.original_message_id = " ".join(headers.get("message-id", "").split())
    if kind == "Complaint":
        body = _dict(note.get("complaint"))
        rcpts = [a for a in (bare_address(str(r.get("emailAddress", "")))
                             for r in _dicts(body.get("complainedRecipients"))) if a]
        ftype = str(body.get("complaintFeedbackType") or "abuse").lower()[:40]
        report.kind = "complaint"
        report.complaint = Complaint(
            feedback_type=ftype, recipients=rcpts,
            original_mail_from=bare_address(str(mail.get("source") or "")),
            source_ip=str(mail.get("sourceIp") or "")[:45],
            user_agent=" ".join(str(body.get("userAgent") or "").split())[:200],
            message_id=report.original_message_id, return_path=report.original_return_path)
        report.recipients = [ReportRecipient(address=a, action="complained") for a in rcpts]
        return report
    if kind == "Delivery":
        body = _dict(note.get("delivery"))
        said = " ".join(str(body.get("smtpResponse") or "").split())[:500]
        remote = str(body.get("reportingMTA") or "").partition(";")[2].strip() or \
            str(body.get("reportingMTA") or "")[:255]
        listed = body.get("recipients")
        named = listed if isinstance(listed, list) else []
        report.recipients = [ReportRecipient(address=a, action="delivered",
                                             status=_status_of(said) or "2.0.0",
                                             diagnostic=said, remote_mta=remote)
                             for a in dict.fromkeys(bare_address(str(r)) for r in named) if a]
        report.kind = _kind(report.recipients)
        return report
    body = _dict(note.get("bounce"))
    btype, sub = str(body.get("bounceType") or ""), str(body.get("bounceSubType") or "")
    hard = btype.lower() == "permanent"
    remote = str(body.get("reportingMTA") or "").partition(";")[2].strip()
    for item in _dicts(body.get("bouncedRecipients")):
        address = bare_address(str(item.get("emailAddress", "")))
        if not address or any(r.address == address for r in report.recipients):
            continue
        diag = " ".join(str(item.get("diagnosticCode") or "").split())[:500] or \
            f"ses; {btype} {sub}".strip()
        found = _ENHANCED.search(str(item.get("status") or "")) or _ENHANCED.search(diag)
        detail = found.group(0)[2:] if found else _SES_STATUS.get(sub.lower(), "0.0")
        status = ("5." if hard else "4.") + detail
        report.recipients.append(ReportRecipient(
            address=address, action="failed", status=status, permanent=hard,
            category=classifier.classify(status, f"{diag} {sub}"), diagnostic=diag,
            remote_mta=remote))
    report.kind = "bounce" if report.recipients else "not-a-report"
    return report


def _parse_report(data: bytes, classifier: Classifier) -> Report:
    msg = message_from_bytes(data)
    to = [bare_address(str(v)) for v in (msg.get_all("To") or [])]
    report = Report(kind="not-a-report", to=[a for a in to if a])
    note = _ses_notification(msg, data)
    if note is not None:
        return _ses_report(note, report, classifier)
    original = returned_message(msg)
    if original is not None:
        report.original_message_id = " ".join(str(original.get("Message-ID", "")).split())
        report.original_return_path = bare_address(str(original.get("Return-Path", "")))
    complaint = parse_arf(msg)
    if complaint is not None:
        report.kind, report.method, report.complaint = "complaint", "arf", complaint
        report.recipients = [ReportRecipient(address=a, action="complained")
                             for a in complaint.recipients]
        report.original_message_id = complaint.message_id or report.original_message_id
        report.original_return_path = complaint.return_path or report.original_return_path
        return report
    recipients = _dsn(msg, classifier)
    if recipients:
        report.kind, report.method, report.recipients = _kind(recipients), "dsn", recipients
        return report
    if _looks_like_bounce(msg) or recipients is not None:
        recipients = _heuristic(msg, classifier)
        if recipients:
            report.kind, report.method = _kind(recipients), "heuristic"
            report.recipients = recipients
            return report
    auto = str(msg.get("Auto-Submitted", "")).lower().startswith("auto-replied")
    if auto or _AUTO_SUBJECT.search(str(msg.get("Subject", ""))) or msg.get("X-Autoreply"):
        sender = bare_address(str(msg.get("From", "")))
        report.kind, report.method = "auto-reply", "rfc3834"
        report.recipients = [ReportRecipient(address=sender, action="auto-replied")] if sender \
            else []
    return report
