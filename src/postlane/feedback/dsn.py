"""RFC 3464 delivery status notifications (bounces and delay warnings).

The bounce must be machine-readable (senders' bounce processors key on Status and
Final-Recipient) and must never itself provoke a bounce, hence should_bounce() and the
Auto-Submitted header. The bounce's own envelope sender must be the null sender "<>".
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage, Message, MIMEPart
from email.policy import SMTP
from email.utils import make_msgid

from ..maildate import header_date

__all__ = ["FailedRecipient", "build_bounce", "should_bounce"]

# SMTP policy, but fold only past RFC 5322's hard 998 limit: folding at 78 would turn long
# tokens in Diagnostic-Code (URLs, server ids) into RFC 2047 encoded words, which DSN
# parsers do not decode.
_POLICY = SMTP.clone(max_line_length=998, refold_source="none")
# refold_source "none": the returned original's fields are written as they came. Refolding one
# over the limit decoded its RFC 2047 words, and an encoded CR LF became fields of their own.
_DIAG_MAX = 900  # keeps "Diagnostic-Code: smtp; ..." under 998 octets, so it is never encoded
_ACTIONS = frozenset({"failed", "delayed", "relayed"})
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_EOL = re.compile(rb"\r\n|\r|\n")
_PRINTABLE = re.compile(r"[ -~]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(slots=True)
class FailedRecipient:
    """One recipient's outcome as it should appear in the DSN."""

    address: str
    action: str  # "failed" | "delayed" | "relayed" (NOTIFY=SUCCESS, no report from beyond)
    status: str  # "5.1.1", "4.4.7", ...
    diagnostic: str = ""  # remote reply verbatim, e.g. "550 5.1.1 <x@y>: no such user"
    remote_mta: str = ""  # e.g. "mx1.example.com"
    orcpt: str = ""  # "rfc822;addr" as given at intake
    last_attempt: float | None = None


def _bare(address: str) -> str:
    return address.strip().removeprefix("<").removesuffix(">").strip()


def should_bounce(sender: str) -> bool:
    """False for the null sender and MAILER-DAEMON: never bounce a bounce (RFC 5321 4.5.5)."""
    addr = _bare(sender)
    if not addr:
        return False
    local = addr.rpartition("@")[0] if "@" in addr else addr
    return local.lower() != "mailer-daemon"


def _one_line(text: str) -> str:
    """Collapse multi-line SMTP replies and strip anything that could inject a header."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _escaped(text: str) -> str:
    """DSN fields are printable US-ASCII: the rest (non-ASCII, and controls such as NUL, ESC
    or a CR LF decoded from xtext) as RFC 6533 embedded-unicode \\x{HEX}; and the "?" of
    "=?" too, because the email package decodes RFC 2047 words in a field it is given (even in
    an address's quoted local part) and wrote what they decode to, a CR LF included."""
    if not _PRINTABLE.fullmatch(text):
        text = "".join(ch if " " <= ch <= "~" else f"\\x{{{ord(ch):X}}}" for ch in text)
    return text.replace("=?", "=\\x{3F}") if "=?" in text else text


def _visible(text: str) -> str:
    """A remote reply for the human-readable part: its control characters (a NUL, which 8bit
    MIME data must not hold, RFC 2045 2.8; a terminal's escape sequences) as RFC 6533
    \\x{HEX}, as in the delivery-status part; its UTF-8 text as it is."""
    return _CONTROL.sub(lambda m: f"\\x{{{ord(m.group()):X}}}", text)


def _dsn_text(text: str) -> str:
    """A remote reply or name as one line of a DSN field (multi-line replies joined)."""
    return _escaped(_one_line(text))


def _address_field(address: str) -> str:
    if address.isascii():
        return _escaped(f"rfc822; {address}")
    # RFC 6533 utf-8-addr-xtext: "+", "=", "\" and non-ASCII become \x{HEX}.
    escaped = "".join(
        ch if ch.isascii() and ch not in "+=\\" else f"\\x{{{ord(ch):X}}}" for ch in address
    )
    return f"utf-8; {escaped}"


def _original_recipient(orcpt: str) -> str:
    """The ORCPT parameter as the DSN field: an rfc822 address decoded from xtext (RFC 3461
    4.2: ``bob+2Btag@x`` is ``bob+tag@x``), as Postfix and Sendmail write it; other types as
    given (RFC 6533's utf-8-addr-xtext is already the DSN form). An rfc822 address that decodes
    to UTF-8 (``+C3+BCnal@x``, nodemailer's ORCPT of ``ünal@x`` in an SMTPUTF8 transaction) is
    written as RFC 6533's ``utf-8;`` type, whose \\x{HEX} are code points."""
    kind, sep, address = orcpt.partition(";")
    if not sep:
        kind, sep, address = "rfc822", "; ", kind
    if kind.strip().lower() == "rfc822":  # decoded first: "+0D+0A" is a CR LF, escaped below
        address = _unxtext(address)
        if not address.isascii() and address.isprintable():
            return _address_field(address)
    return _escaped(f"{kind}{sep}{address}")


_XTEXT_HEX_BYTES = re.compile(rb"\+([0-9A-F]{2})")
_STRAY_BYTE = re.compile("[\udc80-\udcff]")


def _unxtext(text: str) -> str:
    """RFC 3461 xtext decoded (``+2B`` is ``+``): ENVID and ORCPT arrive encoded. xtext encodes
    octets: those of a UTF-8 character (``+C3+BC``, as nodemailer and other clients encode one)
    decode to that character, not to one character per octet ("Ã¼"); an octet that is not part
    of UTF-8 stays a character of its own (Latin-1)."""
    if "+" not in text:
        return text
    raw = _XTEXT_HEX_BYTES.sub(lambda m: bytes([int(m.group(1), 16)]),
                               text.encode("utf-8", "surrogatepass"))
    decoded = raw.decode("utf-8", "surrogateescape")
    return _STRAY_BYTE.sub(lambda m: chr(ord(m.group()) - 0xDC00), decoded)


def _block(fields: list[tuple[str, str]]) -> Message:
    block = Message(policy=_POLICY)
    for name, value in fields:
        block[name] = value
    return block


def _human_text(reporting_mta: str, recipients: Sequence[FailedRecipient], queue_id: str) -> str:
    failed = [r for r in recipients if r.action == "failed"]
    delayed = [r for r in recipients if r.action == "delayed"]
    relayed = [r for r in recipients if r.action == "relayed"]

    def line(r: FailedRecipient) -> str:
        reply = _visible(_one_line(r.diagnostic)) or f"status {r.status}"
        where = f"host {r.remote_mta} said: " if r.remote_mta and r.diagnostic else ""
        return f"<{_bare(r.address)}>: {where}{reply}"

    out = [f"This is the mail system at host {reporting_mta}.", ""]
    if failed:
        out += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. The original message",
            "(or its headers) is attached below.",
            "",
            *map(line, failed),
            "",
        ]
    if delayed:
        out += [
            "THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND YOUR MESSAGE.",
            "",
            "Your message has not yet been delivered to the recipients below.",
            "The mail system will keep trying.",
            "",
            *map(line, delayed),
            "",
        ]
    if relayed:
        out += [
            "Your message was successfully relayed to the recipients below, as you",
            "asked (NOTIFY=SUCCESS). Their mail systems will not report its delivery",
            "to you: you may receive no further notifications.",
            "",
            *map(line, relayed),
            "",
        ]
    out.append("For further assistance, please contact your postmaster.")
    if queue_id:
        out.append(f"Queue ID: {queue_id}")
    return "\n".join(out) + "\n"


def _original_part(original: bytes, ret: str) -> Message:
    """The original's headers (RET=HDRS) or whole message (RET=FULL), bytes kept as given;
    with UTF-8 in its header (RFC 6532) as message/global-headers or message/global (RFC 6533
    6.3), so the DSN itself needs 8BITMIME only, not SMTPUTF8."""
    data = _EOL.sub(b"\r\n", original)
    match = _HEADER_END.search(data)
    utf8 = not (data[: match.start()] if match else data).isascii()
    if ret == "HDRS":
        data = data[: match.start()] + b"\r\n" if match else data
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    part = MIMEPart(policy=_POLICY)
    # Neither type may be base64-encoded (RFC 2046 5.2.1); 8-bit bytes are carried as-is.
    cte = "7bit" if data.isascii() else "8bit"
    if utf8:
        part["Content-Type"] = "message/global-headers" if ret == "HDRS" else "message/global"
        part["Content-Transfer-Encoding"] = cte
        part.set_payload([message_from_bytes(data, policy=_POLICY)])
    elif ret == "HDRS":
        part["Content-Type"] = "text/rfc822-headers"
        part["Content-Transfer-Encoding"] = cte
        # surrogateescape lets BytesGenerator write the exact original bytes back out.
        part.set_payload(data.decode("ascii", "surrogateescape"))
    else:
        part["Content-Type"] = "message/rfc822"
        part["Content-Transfer-Encoding"] = cte
        part.set_payload([message_from_bytes(data, policy=_POLICY)])
    return part


def build_bounce(
    *,
    reporting_mta: str,
    sender: str,
    recipients: Sequence[FailedRecipient],
    original: bytes,
    arrival_date: float,
    envid: str = "",
    ret: str = "HDRS",
    queue_id: str = "",
    postmaster: str | None = None,
    now: float | None = None,
) -> bytes:
    """Build a multipart/report DSN (RFC 3464/6522) to ``sender``; CRLF line endings."""
    to = _bare(sender)
    if not to:
        raise ValueError("cannot build a DSN for the null sender")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    ret = ret.upper()
    if ret not in ("HDRS", "FULL"):
        raise ValueError(f"RET must be HDRS or FULL, not {ret!r}")
    for r in recipients:
        if r.action not in _ACTIONS:
            raise ValueError(f"DSN action must be failed, delayed or relayed, not {r.action!r}")
        if not _STATUS.fullmatch(r.status):
            raise ValueError(f"invalid DSN status {r.status!r} for {r.address!r}")
    now = time.time() if now is None else now
    policy = _POLICY if to.isascii() else _POLICY.clone(utf8=True)
    actions = {r.action for r in recipients}

    msg = EmailMessage(policy=policy)
    from_addr = postmaster or f"MAILER-DAEMON@{reporting_mta}"
    msg["From"] = from_addr if "<" in from_addr else f"Mail Delivery System <{from_addr}>"
    msg["To"] = to.replace("=?", "=\\x{3F}") if "=?" in to else to  # see _escaped
    msg["Subject"] = (  # Postfix's wording
        "Undelivered Mail Returned to Sender" if "failed" in actions
        else "Delayed Mail (still being retried)" if actions == {"delayed"}
        else "Successful Mail Delivery Report" if actions == {"relayed"}
        else "Delivery Status Notification"
    )
    msg["Date"] = header_date(now)
    msg["Message-ID"] = make_msgid(domain=reporting_mta)
    msg["Auto-Submitted"] = "auto-replied"
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = "multipart/report; report-type=delivery-status"

    text = MIMEPart(policy=policy)
    text.set_content(_human_text(reporting_mta, recipients, queue_id))

    # Field order follows the RFC 3464 section 2.2 grammar; extension fields go last.
    per_message = [("Original-Envelope-Id", _escaped(_unxtext(envid)))] if envid else []
    per_message += [
        ("Reporting-MTA", f"dns; {_dsn_text(reporting_mta)}"),
        ("Arrival-Date", header_date(arrival_date)),
    ]
    if queue_id:
        per_message.append(("X-Postlane-Queue-ID", _dsn_text(queue_id)))
    blocks: list[Message | str] = [_block(per_message)]  # what set_payload takes
    for r in recipients:
        fields: list[tuple[str, str]] = []
        if r.orcpt:
            fields.append(("Original-Recipient", _original_recipient(r.orcpt)))
        fields += [
            ("Final-Recipient", _address_field(_bare(r.address))),
            ("Action", r.action),
            ("Status", r.status),
        ]
        if r.remote_mta:
            fields.append(("Remote-MTA", f"dns; {_dsn_text(r.remote_mta)}"))
        if r.diagnostic:
            fields.append(("Diagnostic-Code", f"smtp; {_dsn_text(r.diagnostic)[:_DIAG_MAX]}"))
        if r.last_attempt is not None:
            fields.append(("Last-Attempt-Date", header_date(r.last_attempt)))
        blocks.append(_block(fields))
    status = MIMEPart(policy=policy)
    status["Content-Type"] = "message/delivery-status"
    status.set_payload(blocks)

    msg.set_payload([text, status, _original_part(original, ret)])
    return msg.as_bytes()
