"""Feedback reports: RFC 5965 ARF (abuse, opt-out, ...), RFC 6591 authentication-failure reports,
and the non-standard complaints that large providers still send (Hotmail JMRP, Apple's
unsubscribe mail).

What the node needs from a report is *whom* to stop mailing. Providers often redact the
recipient, so it is taken, in order, from Original-Rcpt-To / Removal-Recipient, the VERP address in
the returned message's Return-Path (exact), the provider's own recipient header, and last the
returned message's To header when it holds exactly one address.
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from dataclasses import dataclass, field
from email import message_from_bytes
from email.header import Header, decode_header
from email.message import Message
from email.utils import getaddresses, parsedate_to_datetime

__all__ = ["QUOTED_ADDR", "Complaint", "bare_address", "field_text", "message_body", "parse_arf",
           "returned_message"]

# \w is Unicode: an ASCII-only pattern cut "rg@example.net" out of "jörg@example.net" (RFC 6531).
# A byte that was not UTF-8 (U+FFFD after decoding, a surrogate from the email package) is no
# boundary either: "j\xf6rg@example.net" in ISO-8859-1 named rg@example.net, and
# "a@mail.ex\xe4mple.com" a@mail.ex, other people
_BAD = "\ufffd\udc80-\udcff"
_ADDR = re.compile(rf"(?<![\w.%+=!#$&'*/?^`{{|}}~{_BAD}-])[\w.%+=!#$&'*/?^`{{|}}~-]+@[\w-]+"
                   rf"(?:\.[\w-]+)+(?![\w{_BAD}-]|\.[\w{_BAD}-])")
QUOTED_ADDR = re.compile(r'"(?:[^"\\\r\n]|\\.)*"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+')
"""``"john doe"@example.com`` (RFC 5321 quoted-string), which ``_ADDR`` cuts apart."""
_IP = re.compile(r"[0-9a-fA-F:.]+")
_JMRP = re.compile(r"complaint about message from", re.IGNORECASE)


@dataclass
class Complaint:
    feedback_type: str  # abuse, fraud, virus, opt-out, not-spam, auth-failure, other
    recipients: list[str] = field(default_factory=list)
    original_mail_from: str = ""
    source_ip: str = ""
    user_agent: str = ""
    arrival_date: float | None = None
    reported_domains: list[str] = field(default_factory=list)
    auth_failure: str = ""
    original_envelope_id: str = ""
    message_id: str = ""  # of the reported (original) message
    return_path: str = ""  # of the reported message: our VERP address if it was ours
    headers: dict[str, str] = field(default_factory=dict)  # selected original headers

    def as_dict(self) -> dict:
        return {"feedback_type": self.feedback_type, "recipients": self.recipients,
                "original_mail_from": self.original_mail_from, "source_ip": self.source_ip,
                "user_agent": self.user_agent, "arrival_date": self.arrival_date,
                "reported_domains": self.reported_domains, "auth_failure": self.auth_failure,
                "original_envelope_id": self.original_envelope_id,
                "message_id": self.message_id, "return_path": self.return_path}


def _decoded(part: Message) -> bytes:
    """The transfer-decoded body of a non-multipart part (get_payload(decode=True) is typed
    as any payload; for a leaf part it is bytes, or None when there is none)."""
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def message_body(part: Message) -> bytes | None:
    """The transfer-decoded body of a message/* part sent base64 or quoted-printable (RFC 2046
    forbids it; Exchange and some FBLs do it): the email package parses the encoded text as
    fields or headers, so the part is written back out and decoded. None if not encoded
    (or not really base64)."""
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if cte not in ("base64", "quoted-printable"):
        return None
    body = re.split(rb"\r?\n\r?\n", part.as_bytes(), maxsplit=1)[-1]
    if cte == "quoted-printable":
        return quopri.decodestring(body)
    try:  # strict: text labelled base64 that is not is read as the package parsed it
        return base64.b64decode(b"".join(body.split()), validate=True)
    except binascii.Error:
        return None


def field_text(value: object) -> str:
    """A field's value as text; raw UTF-8 (RFC 6532/6533 reports) comes back from the email
    package as a Header of unknown-8bit bytes, whose str() is U+FFFD for each byte."""
    if isinstance(value, Header):
        return "".join(b.decode("utf-8", "replace") if isinstance(b, bytes) else b
                       for b, _ in decode_header(value))
    return "" if value is None else str(value)


def _fields(part: Message) -> list[tuple[str, str]]:
    """Header-style fields of a message/feedback-report (or message/delivery-status) part."""
    payload = part.get_payload()
    encoded = message_body(part)
    if isinstance(payload, list) and encoded is None:
        out: list[tuple[str, str]] = []
        for block in payload:
            if isinstance(block, Message):
                out.extend((k.lower(), " ".join(field_text(v).split()))
                           for k, v in block.items())
        return out
    out = []
    raw = _decoded(part) if encoded is None else encoded
    for line in re.sub(r"\r?\n[ \t]+", " ", raw.decode("utf-8", "replace")).splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            out.append((key.strip().lower(), value.strip()))
    return out


def bare_address(value: str) -> str:
    """``"Name" <a@b>`` / ``rfc822; a@b`` / ``<a@b>`` -> ``a@b`` (lower-cased domain)."""
    value = value.split(";", 1)[1] if ";" in value and "@" not in value.split(";", 1)[0] else value
    found = QUOTED_ADDR.search(value) or _ADDR.search(value)
    if not found:
        return ""
    local, _, domain = found.group(0).rpartition("@")
    return f"{local}@{domain.lower()}"


def returned_message(msg: Message) -> Message | None:
    """The reported or bounced message (message/rfc822 or text/rfc822-headers part; for a
    message with UTF-8 headers message/global or message/global-headers, RFC 6533 6.3)."""

    for part in list(msg.walk())[1:]:
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/rfc822-headers", "message/global",
                     "message/global-headers"):
            encoded = message_body(part)
            if encoded is not None:
                return message_from_bytes(encoded)
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        if ctype == "text/rfc822-headers":
            return message_from_bytes(_decoded(part))
    return None


def _date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _single_to(original: Message) -> str:
    addresses = [a for _, a in getaddresses([str(v) for v in original.get_all("To", [])])
                 if _ADDR.fullmatch(a or "")]
    return bare_address(addresses[0]) if len(addresses) == 1 else ""


def _fill_from_original(report: Complaint, original: Message | None) -> None:
    if original is None:
        return
    report.message_id = report.message_id or " ".join(str(original.get("Message-ID", "")).split())
    report.return_path = bare_address(str(original.get("Return-Path", "")))
    for name in ("From", "To", "Subject", "Message-ID", "X-Correlation-ID", "X-Postlane-Queued"):
        if original.get(name) is not None:
            report.headers[name] = " ".join(str(original.get(name)).split())[:300]
    if not report.recipients:
        hotmail = bare_address(str(original.get("X-HmXmrOriginalRecipient", "")))
        guess = hotmail or _single_to(original)
        if guess:
            report.recipients.append(guess)


def parse_arf(msg: Message) -> Complaint | None:
    """A Complaint if ``msg`` is a feedback report, else None."""
    report_part = next((p for p in msg.walk()
                        if p.get_content_type() == "message/feedback-report"), None) or \
        _mislabelled_report(msg)
    if report_part is None:
        return _non_standard(msg)
    fields = _fields(report_part)
    first: dict[str, str] = {}
    for key, value in fields:
        first.setdefault(key, value)
    report = Complaint(feedback_type=first.get("feedback-type", "other").lower(),
                       user_agent=first.get("user-agent", ""),
                       original_mail_from=bare_address(first.get("original-mail-from", "")),
                       auth_failure=first.get("auth-failure", "").lower(),
                       original_envelope_id=first.get("original-envelope-id", ""))
    ip = _IP.match(first.get("source-ip", ""))
    report.source_ip = ip.group(0) if ip else ""
    report.arrival_date = _date(first.get("arrival-date") or first.get("received-date", ""))
    for key, value in fields:
        if key in ("original-rcpt-to", "removal-recipient"):
            addr = bare_address(value)
            if addr and addr not in report.recipients:
                report.recipients.append(addr)
        elif key == "reported-domain":
            report.reported_domains.append(value)
    # the reported message beside the report part: in an ARF forwarded as message/rfc822 the
    # first one is the forwarded report itself (whose To: is our FBL address)
    container = next((p for p in msg.walk() if p.is_multipart() and any(
        c is report_part for c in p.get_payload())), msg)
    _fill_from_original(report, returned_message(container))
    return report


def _mislabelled_report(msg: Message) -> Message | None:
    """A report=feedback-report whose fields come as text/plain (some small providers'
    FBLs): the part after the human-readable one, if it holds a Feedback-Type field."""
    for part in msg.walk():
        if part.get_content_type() != "multipart/report" or \
                str(part.get_param("report-type", "")).lower() != "feedback-report":
            continue
        parts = part.get_payload()
        if isinstance(parts, list) and len(parts) > 1 and isinstance(parts[1], Message) and \
                parts[1].get_content_type() == "text/plain" and re.search(
                rb"^feedback-type:", _decoded(parts[1]), re.IGNORECASE | re.MULTILINE):
            return parts[1]
    return None


def _non_standard(msg: Message) -> Complaint | None:
    """Hotmail's JMRP (a forwarded message, no report part) and Apple Mail's unsubscribe."""
    if str(msg.get("X-Apple-Unsubscribe", "")).strip().lower() == "true":
        sender = bare_address(str(msg.get("From", "")))
        return Complaint(feedback_type="opt-out", recipients=[sender] if sender else [],
                         user_agent="Apple Mail")
    if _JMRP.search(str(msg.get("Subject", ""))) and returned_message(msg) is not None:
        report = Complaint(feedback_type="abuse", user_agent="JMRP")
        found = _IP.search(str(msg.get("Subject", "")).rpartition(" ")[2])
        report.source_ip = found.group(0) if found else ""
        _fill_from_original(report, returned_message(msg))
        return report
    return None
