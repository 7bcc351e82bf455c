"""The injection request: a raw RFC 5322 message or structured fields turned into MIME.

Everything that ends up in a header is checked for CR/LF here, so a field can never smuggle in
another header (header injection) or a second recipient: line breaks, other control characters
and RFC 2047 encoded words that decode to them (the email package decodes them when a field is
set, and Python before 3.11.10 wrote the decoded line break out), and the built message is read
back to check that each field stayed one field.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from collections.abc import Iterator
from email import message_from_bytes
from email.errors import MessageError
from email.header import decode_header
from email.message import EmailMessage
from email.policy import compat32
from email.policy import default as default_policy
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..address import PathError, domain_key, parse_path
from ..maildate import header_date

_ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"\\]+@(?:[A-Za-z0-9.-]|[^\x00-\x7f])+$")
"""Bare local@domain; a domain of LDH labels or U-labels (``parse_path`` then checks IDNA 2008,
as the SMTP door does with SMTPUTF8)."""
_HEADER_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]{1,76}$")
_RESERVED = {"from", "to", "cc", "bcc", "subject", "mime-version", "x-postlane-class", "date"}
"""With every Content-* field: set from their own fields (the email package replaces a
part's Content-* fields when it builds the part, so one given in ``headers`` was dropped)."""


MAX_RECIPIENTS = 1000
"""Recipients of one injected message, ``to``, ``cc`` and ``bcc`` together (as the SMTP door's
``max_recipients`` default)."""

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_ENCODED_WORD = re.compile(r"=\?[^?]*\?[bBqQ]\?.*?\?=", re.DOTALL)


def valid_unicode(data: object) -> object:
    """Refuse (ValueError naming where) a string holding half a UTF-16 pair: JSON may escape
    one ("\\ud800"), no UTF-8 text can hold it, and the email package, the spool and SQLite
    failed on it later (500)."""
    stack: list[tuple[str, object]] = [("the body", data)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, dict):
            stack += [(where, key) for key in item]  # a key is named by its dict
            stack += [(f"{key}" if where == "the body" else f"{where}.{key}", value)
                      for key, value in item.items() if not _SURROGATE.search(str(key))]
        elif isinstance(item, list):
            stack += [(f"{where}.{i}", value) for i, value in enumerate(item)]
        elif isinstance(item, str) and _SURROGATE.search(item):
            raise ValueError(f"{where} is not valid Unicode (a lone surrogate, \\ud800-\\udfff)")
    return data


def _address(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("must not contain CR or LF")
    try:
        if len(value) > 254 or not _ADDRESS.match(value):
            raise PathError("local@domain, no display name")
        parse_path(f"<{value}>", utf8=True)  # as strict as the SMTP door
    except PathError as exc:
        raise ValueError(f"not an e-mail address: {value!r} ({exc})") from None
    return value


def _one_line(value: str) -> str:
    # every break str.splitlines() knows (VT, FF, NEL, U+2028 ...), as the email package
    if "".join(value.splitlines()) != value:
        raise ValueError("must not contain a line break (CR or LF, nor VT, FF, NEL, U+2028 ...)")
    # the email package writes other controls as they are: a NUL ends the field for some readers
    if _CONTROL.search(value):
        raise ValueError("must not contain a control character (NUL, ESC, DEL ...; a tab is"
                         " allowed)")
    if "=?" in value and any("".join(text.splitlines()) != text or _CONTROL.search(text)
                             for text in _decoded_words(value)):
        raise ValueError("must not contain an encoded word (RFC 2047) that decodes to a line"
                         " break or a control character")
    return value


def _decoded_words(value: str) -> Iterator[str]:
    """The text of each RFC 2047 encoded word in ``value``, found as loosely as the email
    package's parser finds them (white space inside, an unknown charset read as Latin-1)."""
    for word in _ENCODED_WORD.findall(value):
        try:
            parts = decode_header(word)
        except (ValueError, MessageError):
            yield word
            continue
        for data, charset in parts:
            if isinstance(data, str):
                yield data
                continue
            try:
                yield data.decode(charset or "ascii")
            except (LookupError, UnicodeDecodeError):
                yield data.decode("latin-1")


Address = Annotated[str, AfterValidator(_address)]
OneLine = Annotated[str, AfterValidator(_one_line)]


def _data_type(value: str) -> str:
    """Refuse a type whose part holds parts rather than data: the email package wrote such
    an attachment base64-encoded (message/rfc822: forbidden by RFC 2046 5.2.1) or as a
    multipart without a boundary, which no reader can take apart."""
    kind = value.lower()
    if kind.startswith("multipart/") or (kind.startswith("message/")
                                         and kind != "message/rfc822"):
        raise ValueError(f"{value} cannot be attached (a part of that type holds parts, not"
                         " data): attach a message as message/rfc822, anything else as"
                         " application/octet-stream")
    return value


class Attachment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filename: OneLine = Field(min_length=1, max_length=255)
    content_type: Annotated[str, AfterValidator(_data_type)] = Field(
        "application/octet-stream", pattern=r"^[\w.+-]+/[\w.+-]+$",
        description="message/rfc822 attaches the content as a message; no multipart/* nor"
                    " other message/*")
    content: str = Field(description="base64")

    def data(self) -> bytes:
        return base64.b64decode(self.content, validate=True)


class MessageIn(BaseModel):
    """Either ``raw`` / ``raw_base64`` (a complete message; ``from`` and ``to`` are then the
    envelope) or structured fields (``subject``, ``text`` and/or ``html``, ...)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: Address = Field(alias="from", description="envelope sender (and From: if structured)")
    to: list[Address] = Field(min_length=1, max_length=MAX_RECIPIENTS,
                              description=f"with cc and bcc at most {MAX_RECIPIENTS} recipients")
    cc: list[Address] = Field([], max_length=MAX_RECIPIENTS)
    bcc: list[Address] = Field([], max_length=MAX_RECIPIENTS,
                               description="envelope only, no header")
    subject: OneLine | None = Field(None, max_length=998)
    text: str | None = None
    html: str | None = None
    headers: dict[str, OneLine] = {}
    attachments: list[Attachment] = []
    raw: str | None = Field(None, description="RFC 5322 message as text")
    raw_base64: str | None = Field(None, description="RFC 5322 message, base64 encoded")
    class_: OneLine | None = Field(None, alias="class", description="traffic class (default:"
                                   " X-Postlane-Class of a raw message, then the node default)")
    correlation_id: OneLine | None = Field(None, max_length=200)

    _unicode = model_validator(mode="before")(staticmethod(valid_unicode))

    @model_validator(mode="after")
    def _shape(self) -> MessageIn:
        raw = self.raw is not None or self.raw_base64 is not None
        if self.raw is not None and self.raw_base64 is not None:
            raise ValueError("give raw or raw_base64, not both")
        count = len(self.to) + len(self.cc) + len(self.bcc)
        if count > MAX_RECIPIENTS:  # each list's own cap let one message have 3,000
            raise ValueError(f"{count} recipients (to, cc and bcc together): at most"
                             f" {MAX_RECIPIENTS} a message")
        structured = [name for name in ("subject", "text", "html") if getattr(self, name)]
        structured += [name for name in ("cc", "headers", "attachments") if getattr(self, name)]
        if raw and structured:
            raise ValueError(f"a raw message cannot be combined with {', '.join(structured)}")
        if not raw and self.text is None and self.html is None:
            raise ValueError("give raw, raw_base64, or at least one of text and html")
        seen: set[str] = set()
        for name in self.headers:
            if name.lower() in seen:  # two fields (a 500 for a Message-ID, a Reply-To ...)
                raise ValueError(f"headers: {name!r} given twice (names are case-insensitive)")
            seen.add(name.lower())
            if not _HEADER_NAME.match(name):
                raise ValueError(f"headers: {name!r} is not a valid header field name")
            if name.lower() in _RESERVED or name.lower().startswith("content-"):
                raise ValueError(f"headers: {name!r} is set from its own field, not headers")
        if self.raw_base64 is not None:
            try:
                base64.b64decode(self.raw_base64, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("raw_base64 is not valid base64") from None
        for att in self.attachments:
            try:
                att.data()
            except (binascii.Error, ValueError):
                raise ValueError(f"attachment {att.filename!r}: content is not valid base64")\
                    from None
        return self

    def is_raw(self) -> bool:
        """Whether the message is given whole (``raw`` or ``raw_base64``)."""
        return self.raw is not None or self.raw_base64 is not None

    def envelope_recipients(self) -> list[str]:
        """``to``, ``cc`` and ``bcc`` with each mailbox once, as the SMTP door takes a
        duplicate RCPT: same local part, domain in any case or in U- or A-labels
        (``jörg@exämple.com`` is ``jörg@xn--exmple-cua.com``), the local part in either
        Unicode form (compared in NFC, RFC 6530 10.1); each was a copy of its own."""
        seen: dict[str, str] = {}
        for address in (*self.to, *self.cc, *self.bcc):
            local, _, domain = address.rpartition("@")
            seen.setdefault(f"{unicodedata.normalize('NFC', local)}@{domain_key(domain)}",
                            address)
        return list(seen.values())

    def build(self, correlation_header: str) -> bytes:
        """The message as bytes, with the correlation id header if one was given."""
        if self.raw is not None or self.raw_base64 is not None:
            data = (self.raw.encode() if self.raw is not None
                    else base64.b64decode(self.raw_base64 or ""))
            if self.correlation_id:
                data = f"{correlation_header}: {self.correlation_id}\r\n".encode() + data
            return data
        # A non-ASCII address is written as UTF-8 (RFC 6532): the email package's encoded
        # words in an addr-spec (=?utf-8?q?pr=C3=BCfer?=@...) are forbidden (RFC 2047 5) and
        # undeliverable. Intake then marks the message SMTPUTF8 (policy/intake.py).
        ascii_only = all(a.isascii() for a in (self.from_, *self.to, *self.cc))
        msg = EmailMessage(policy=default_policy if ascii_only
                           else default_policy.clone(utf8=True))
        msg["From"] = self.from_
        msg["To"] = ", ".join(self.to)
        if self.cc:
            msg["Cc"] = ", ".join(self.cc)
        msg["Date"] = header_date()
        if self.subject is not None:
            _set(msg, "Subject", self.subject, "subject")
        if self.correlation_id:
            _set(msg, correlation_header, self.correlation_id, "correlation_id")
        for name, value in self.headers.items():
            _set(msg, name, value, f"headers.{name}")
        if self.text is not None:
            msg.set_content(self.text)
        if self.html is not None:
            if self.text is not None:
                msg.add_alternative(self.html, subtype="html")
            else:
                msg.set_content(self.html, subtype="html")
        for att in self.attachments:
            maintype, subtype = att.content_type.split("/", 1)
            if att.content_type.lower() == "message/rfc822":  # as a message, 7bit or 8bit
                msg.add_attachment(message_from_bytes(att.data(), policy=msg.policy),
                                   filename=att.filename)
            else:
                msg.add_attachment(att.data(), maintype=maintype, subtype=subtype,
                                   filename=att.filename)
        try:
            data = msg.as_bytes()
        except (ValueError, IndexError, MessageError):
            _name_unwritable(msg)
            raise
        _check_fields(msg, data)
        return data


class UnwritableHeader(ValueError):
    """A header field value the email package cannot write as one field (a 422)."""


def _set(msg: EmailMessage, name: str, value: str, field: str) -> None:
    """Set a header field; a value the email package cannot parse as that field (it raised
    IndexError for ``Message-ID: <<<>>>``) is an UnwritableHeader naming the request field."""
    try:
        msg[name] = value
    except (ValueError, IndexError, MessageError):
        raise UnwritableHeader(f"{field}: {value!r} is not a valid {name} field") from None


def _name_unwritable(msg: EmailMessage) -> None:
    """Raise an UnwritableHeader naming the top-level field the email package cannot write
    (``Message-ID: ü@ü`` raised an 'ascii' codec error from ``as_bytes``), if one is."""
    for name, value in msg.items():
        try:
            msg.policy.fold_binary(name, value)
        except (ValueError, IndexError, MessageError):
            field = "subject" if name == "Subject" else f"headers.{name}"
            raise UnwritableHeader(f"{field}: {str(value)!r} is not a valid {name} field")\
                from None


def _check_fields(msg: EmailMessage, data: bytes) -> None:
    """Read the built message back (without decoding anything) and check that every part has
    the fields it was given: a value the email package decoded into a line break was written
    as a field of its own (``Subject: \\r\\nBcc: x``), or ended the header block early."""
    back = message_from_bytes(data, policy=compat32)
    built = [len(part.keys()) for part in msg.walk()]
    read = [len(part.keys()) for part in back.walk()]
    if built != read:
        raise UnwritableHeader("a header field value would be written as more than one field"
                               " (an encoded line break?)")


class Queued(BaseModel):
    queue_id: str
    recipients: int
