"""DMARC aggregate reports (RFC 7489 §7.2 and the RFC 9990 format): from a mail, a ``.xml``,
``.xml.gz`` or ``.zip`` file to one ``AggregateReport``, or a clear reason why not.

Reports come from anyone who can reach the ``rua`` address, so nothing in them is trusted:
the XML is parsed by ``defusedxml`` (DTDs, entity declarations and external references are
refused, so a billion-laughs bomb stops at its ``<!DOCTYPE``) as a stream: each record is
read when it closes and its elements dropped, nesting and the size of one record are bounded,
and counts and dates must be numbers a store can sum. Decompression is streamed and stops at
``max_size`` bytes of output (a 200 MB gzip bomb costs one chunk of memory beyond the limit),
and a zip archive is read member by member under the same budget.

What providers really send is tolerated: namespaces (``urn:ietf:params:xml:ns:dmarc-2.0``,
XML Schema attributes), the old draft format (no ``<version>``, no envelope_from), an outer
wrapper element that is never closed (a ``<feedback>`` inside an unclosed ``<xs:schema>``), bytes
after ``</feedback>``, UTF-16, any encoding the XML declaration names that Python reads
(ISO-8859-1, windows-1252, Shift_JIS ...), empty fields, gzip
streams with trailing bytes, and a whole report e-mail whose attachment holds the report.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import math
import re
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from email import message_from_bytes, policy
from xml.etree.ElementTree import Element, ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import iterparse

__all__ = ["DEFAULT_MAX_SIZE", "AggregateReport", "DMARCError", "Row", "is_aggregate",
           "parse_aggregate"]

DEFAULT_MAX_SIZE = 32 * 1024 * 1024
"""Bytes of XML one report may decompress to (the largest real report in the test corpus is
0.9 MB; a busy domain's daily Google report stays in the low megabytes)."""
_CHUNK = 1 << 20


class DMARCError(ValueError):
    """Not a readable aggregate report; the message says why, for the operator."""


@dataclass(slots=True)
class Row:
    source_ip: str
    count: int
    disposition: str
    dkim_aligned: bool
    """policy_evaluated/dkim = pass: a DKIM signature aligned with the header From domain."""
    spf_aligned: bool
    header_from: str
    envelope_from: str = ""
    envelope_to: str = ""
    dkim: list[dict] = field(default_factory=list)
    """auth_results/dkim: ``{"domain", "selector", "result"}`` per signature."""
    spf: list[dict] = field(default_factory=list)
    """auth_results/spf: ``{"domain", "scope", "result"}``."""
    reasons: list[dict] = field(default_factory=list)
    """policy_evaluated/reason: ``{"type", "comment"}`` (local policy overrides)."""


@dataclass(slots=True)
class AggregateReport:
    org_name: str
    email: str
    report_id: str
    begin: int
    end: int
    policy_domain: str
    policy: dict[str, str]
    """policy_published besides the domain: adkim, aspf, p, sp, pct, np, testing …"""
    rows: list[Row]
    version: str = ""

    @property
    def reporter(self) -> str:
        """Who sent it, for deduplication with the report id: the organisation, or its address
        when the organisation is left empty (some reporters do)."""
        return self.org_name or self.email

    @property
    def digest(self) -> str:
        """What the report says, hashed: a report with the same reporter, address and id but
        another digest is not the same report sent again (a forgery, or a reporter reusing
        ids), and is kept beside the first, not dropped as a duplicate."""
        text = json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def messages(self) -> int:
        return sum(r.count for r in self.rows)

    def as_json(self) -> dict:
        """The ``postlane dmarc parse --json`` shape."""
        return {"org_name": self.org_name, "report_id": self.report_id,
                "policy_domain": self.policy_domain, "begin": self.begin, "end": self.end,
                "records": [{"source_ip": r.source_ip, "count": r.count,
                             "disposition": r.disposition, "header_from": r.header_from,
                             "dkim_aligned": r.dkim_aligned, "spf_aligned": r.spf_aligned}
                            for r in self.rows]}

    def as_dict(self) -> dict:
        return asdict(self)


# -- containers -------------------------------------------------------------------------------

def _gunzip(data: bytes, max_size: int) -> bytes:
    """Streamed, bounded gunzip; bytes after the end of the stream are ignored (Mimecast
    appends a CRLF). Several members (RFC 1952 allows it) are concatenated."""
    out = bytearray()
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        pending = data
        while not inflater.eof:
            try:
                chunk = inflater.decompress(pending, _CHUNK)
            except zlib.error as exc:
                raise DMARCError(f"broken gzip data: {exc}") from None
            pending = inflater.unconsumed_tail
            out += chunk
            if len(out) > max_size:
                raise DMARCError(f"gzip data expands beyond the {_mb(max_size)} limit (a"
                                 " decompression bomb, or raise reputation.dmarc.max_report_size)")
            if not chunk and not pending:
                raise DMARCError("broken gzip data: the stream ends early (truncated)")
        data = inflater.unused_data
        if not data.startswith(b"\x1f\x8b"):
            break
    return bytes(out)


def _unzip(data: bytes, max_size: int) -> bytes:
    """The first ``.xml`` member of a zip archive (else its only member), read in chunks under
    the size budget whatever the archive's directory claims."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if not infos:
            raise DMARCError("the zip archive is empty")
        xml = [i for i in infos if i.filename.lower().endswith(".xml")]
        if not xml and len(infos) > 1:
            raise DMARCError(f"the zip archive holds {len(infos)} files and none is .xml")
        out = bytearray()
        with archive.open((xml or infos)[0]) as member:
            while chunk := member.read(_CHUNK):
                out += chunk
                if len(out) > max_size:
                    raise DMARCError(f"the zip member expands beyond the {_mb(max_size)} limit"
                                     " (a decompression bomb, or raise"
                                     " reputation.dmarc.max_report_size)")
        return bytes(out)
    except DMARCError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
            ValueError) as exc:  # RuntimeError: encrypted member; ValueError: bad header
        raise DMARCError(f"broken zip archive: {exc}") from None


def _attachment(data: bytes) -> bytes:
    """The report inside an e-mail: the first part that is gzip, zip or XML by type or name."""
    try:
        parts = list(message_from_bytes(data, policy=policy.compat32).walk())
    except RecursionError:  # the parser and walk() recurse: 3,000 nested multiparts in 170 KB
        raise DMARCError("the message nests its MIME parts too deep") from None
    for part in parts:
        name = (part.get_filename() or "").lower()
        if part.is_multipart() or (part.get_content_maintype() == "text" and
                                   part.get_content_subtype() != "xml" and
                                   not name.endswith(".xml")):
            continue
        payload = part.get_payload(decode=True)  # bytes, or None when there is none
        if not isinstance(payload, bytes):
            payload = b""
        if _kind(payload) in ("gzip", "zip", "xml"):
            return payload
    raise DMARCError("the message carries no DMARC report (no .xml, .xml.gz or .zip"
                     " attachment)")


def _kind(data: bytes) -> str:
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n")
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:4] == b"PK\x03\x04":
        return "zip"
    if head.startswith(b"<") or data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "xml"  # UTF-8 (perhaps with a BOM) or UTF-16 with its byte order mark
    if re.match(rb"[!-9;-~]+:", head):  # a header field name: an e-mail
        return "mail"
    return "unknown"


def unpack(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """The report's XML from a mail, gzip, zip or XML file (by content, not by file name)."""
    for _ in range(3):  # mail -> zip -> xml at most
        kind = _kind(data)
        if kind == "xml":
            if len(data) > max_size:
                raise DMARCError(f"the report is larger than the {_mb(max_size)} limit")
            return data
        if kind == "gzip":
            data = _gunzip(data, max_size)
        elif kind == "zip":
            data = _unzip(data, max_size)
        elif kind == "mail":
            data = _attachment(data)
        else:
            break
    raise DMARCError("not a DMARC report: neither XML, gzip, zip nor an e-mail carrying one")


# -- XML --------------------------------------------------------------------------------------

_MAX_DEPTH = 32
"""Element nesting a report may use (a real one nests 6 deep, 7 in a wrapper element)."""
_MAX_PART = 2000
"""Elements in one child of ``<feedback>`` (a record has about 20)."""
_KEPT = ("report_metadata", "policy_published", "version")
_MAX_COUNT = 2**32 - 1
"""Messages one record may count: more is not a report but an attempt to overflow the sums."""
_DECLARED = re.compile(rb"(<\?xml[^>]*?encoding\s*=\s*[\"'])([A-Za-z0-9._:-]+)([\"'])")
_MAX_TEXT = 255
"""Characters in one field (a domain name has at most 253; ids and selectors are short)."""
_MAX_COMMENT = 2000
_MAX_TIME = 253402300799
"""9999-12-31T23:59:59Z, the last date a timestamp can show."""


def _to_utf8(xml: bytes, exc: Exception) -> bytes:
    """The document in UTF-8 with its declaration saying so, for the encodings expat does not
    read itself but Python does (Shift_JIS, EUC-JP, GB2312, UTF-32 ...)."""
    declared = _DECLARED.match(xml)
    name = declared.group(2).decode("ascii", "replace") if declared else "?"
    try:
        text = xml.decode(name)
    except (LookupError, UnicodeDecodeError):
        raise DMARCError(f"unreadable encoding {name[:40]!r}: {exc}") from None
    return _DECLARED.sub(rb"\1utf-8\3", text.encode("utf-8"), count=1)


def _read_xml(xml: bytes, transcoded: bool = False) -> tuple[Element, list[Row]]:
    """The ``<feedback>`` element (its metadata and policy) and its records as rows, streamed:
    a record becomes a ``Row`` as soon as it closes and its elements are dropped, and so is
    every element outside ``<feedback>``, so memory follows the rows, not the markup (32 MB of
    empty elements would take ~700 MB as a tree). Nesting and the size of one record are
    bounded. Parsing stops at ``</feedback>``: an outer element that is never closed (a
    ``<feedback>`` inside an unclosed ``<xs:schema>``, seen from ikea.com) or bytes after the
    report do not matter."""
    stack: list[Element] = []
    feedback: Element | None = None
    top, inner, part = "", 0, 0
    rows: list[Row] = []
    kept: set[str] = set()
    try:
        for event, el in iterparse(io.BytesIO(xml), events=("start", "end"), forbid_dtd=True):
            if event == "start":
                stack.append(el)
                top = top or _local(el.tag)
                if len(stack) > _MAX_DEPTH:
                    raise DMARCError(f"refused XML: elements nested deeper than {_MAX_DEPTH}")
                if feedback is None:
                    if _local(el.tag) == "feedback":
                        feedback, inner = el, len(stack) + 1
                elif len(stack) == inner:
                    part = 0
                elif len(stack) > inner:
                    part += 1
                    if part > _MAX_PART:
                        raise DMARCError(f"refused XML: more than {_MAX_PART} elements in one"
                                         f" <{_local(stack[inner - 1].tag)}>")
                continue
            stack.pop()
            if el is feedback:
                return feedback, rows
            if feedback is not None and len(stack) >= inner:
                continue  # inside a record or the metadata: read when its element closes
            if feedback is not None and len(stack) == inner - 1:
                name = _local(el.tag)
                if name == "record":
                    rows.append(_row(el, len(rows) + 1))
                elif name in _KEPT and name not in kept:
                    kept.add(name)  # the first one is read; a million more are dropped
                    continue
            if stack:
                del stack[-1][-1]  # a closing element is its parent's last child
    except DMARCError:
        raise
    except DefusedXmlException as exc:
        raise DMARCError(f"refused XML: {type(exc).__name__} (a report never needs a DTD,"
                         " entities or external references)") from None
    except (ValueError, LookupError) as exc:  # expat: a multi-byte or unknown encoding
        if transcoded:
            raise DMARCError(f"not readable XML: {exc}") from None
        return _read_xml(_to_utf8(xml, exc), transcoded=True)
    except ParseError as exc:
        try:
            xml.decode("utf-8")
        except UnicodeDecodeError as bad:
            if not re.match(rb"<\?xml[^>]*encoding=[\"'](?!utf-?8)", xml, re.IGNORECASE):
                raise DMARCError(f"not valid UTF-8: byte 0x{xml[bad.start]:02x} at offset"
                                 f" {bad.start}") from None
        raise DMARCError(f"not well-formed XML: {exc}") from None
    raise DMARCError(f"not a DMARC aggregate report: the root element is <{top}>, not"
                     " <feedback>")


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1].rsplit(":", 1)[-1].lower() if isinstance(tag, str) else ""


def _child(el: Element | None, name: str) -> Element | None:
    if el is None:
        return None
    return next((c for c in el if _local(c.tag) == name), None)


def _children(el: Element | None, name: str) -> list[Element]:
    return [] if el is None else [c for c in el if _local(c.tag) == name]


def _text(el: Element | None, *path: str, limit: int = _MAX_TEXT) -> str:
    """The stripped text at ``path``; longer than ``limit`` is refused: a 30 MB header_from
    became a /metrics label and a dashboard row."""
    for name in path:
        el = _child(el, name)
    text = (el.text or "").strip() if el is not None else ""
    if len(text) > limit:
        what = "/".join(path) or (_local(el.tag) if el is not None else "")
        raise DMARCError(f"{what} is longer than {limit} characters")
    return text


def _int(value: str, what: str, limit: int) -> int:
    """A non-negative integer up to ``limit`` (``1.0`` and ``1e3`` are read as integers, as
    before; ``inf``, ``nan`` and a number too large to store are refused)."""
    try:
        number = int(value)
    except ValueError:
        try:
            real = float(value)
        except ValueError:
            real = math.nan
        if not math.isfinite(real):
            raise DMARCError(f"{what} is not a number: {value[:40]!r}") from None
        number = int(real)
    if number < 0:
        raise DMARCError(f"{what} is negative: {number}")
    if number > limit:
        raise DMARCError(f"{what} is implausibly large: {str(number)[:40]}")
    return number


def _row(record: Element, n: int) -> Row:
    row = _child(record, "row")
    ip = _text(row, "source_ip")
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise DMARCError(f"record {n}: source_ip {ip[:60]!r} is not an IP address") from None
    # ``::ffff:192.0.2.1`` (reporters storing every address as IPv6) is the IPv4 address: as
    # such it is a pool IP, not a stranger
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    ip = str(mapped or address)
    evaluated = _child(row, "policy_evaluated")
    ids = _child(record, "identifiers")
    auth = _child(record, "auth_results")
    return Row(
        source_ip=ip, count=_int(_text(row, "count") or "0", f"record {n}: count", _MAX_COUNT),
        disposition=_text(evaluated, "disposition").lower() or "none",
        dkim_aligned=_text(evaluated, "dkim").lower() == "pass",
        spf_aligned=_text(evaluated, "spf").lower() == "pass",
        header_from=_text(ids, "header_from").lower(),
        envelope_from=_text(ids, "envelope_from").lower(),
        envelope_to=_text(ids, "envelope_to").lower(),
        dkim=[{"domain": _text(d, "domain").lower(), "selector": _text(d, "selector"),
               "result": _text(d, "result").lower()} for d in _children(auth, "dkim")],
        spf=[{"domain": _text(s, "domain").lower(), "scope": _text(s, "scope").lower(),
              "result": _text(s, "result").lower()} for s in _children(auth, "spf")],
        reasons=[{"type": _text(r, "type"), "comment": _text(r, "comment", limit=_MAX_COMMENT)}
                 for r in _children(evaluated, "reason") if _text(r, "type")])


def _report(root: Element, rows: list[Row]) -> AggregateReport:
    meta = _child(root, "report_metadata")
    published = _child(root, "policy_published")
    if meta is None or published is None:
        raise DMARCError("not a DMARC aggregate report: report_metadata or policy_published"
                         " is missing")
    report_id = _text(meta, "report_id")
    domain = _text(published, "domain").lower()
    org, email = _text(meta, "org_name"), _text(meta, "email")
    missing = [name for name, value in (("report_id", report_id), ("policy_published/domain",
               domain), ("org_name or email", org or email)) if not value]
    if missing:
        raise DMARCError(f"incomplete report: {', '.join(missing)} empty or missing")
    dates = _child(meta, "date_range")
    begin = _int(_text(dates, "begin"), "date_range/begin", _MAX_TIME)
    end = _int(_text(dates, "end"), "date_range/end", _MAX_TIME)
    if end < begin:
        raise DMARCError(f"date_range ends ({end}) before it begins ({begin})")
    policy_ = {name: value for c in published
               if (name := _local(c.tag)) != "domain" and (value := _text(c))}
    return AggregateReport(org_name=org, email=email, report_id=report_id, begin=begin,
                           end=end, policy_domain=domain, policy=policy_, rows=rows,
                           version=_text(root, "version"))


def parse_aggregate(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> AggregateReport:
    """The report in ``data`` (an e-mail, gzip, zip or XML); raises ``DMARCError``."""
    return _report(*_read_xml(unpack(data, max_size)))


def is_aggregate(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> bool:
    """Whether a report posted to the API (``POST /feedback/reports``, which takes bounces and
    ARF too) is a DMARC aggregate report: an XML, gzip or zip file (no bounce or complaint is
    one), or a mail other than a delivery or feedback report (``multipart/report``) whose
    attachment parses as one. A mail whose attachment does not parse is left to the bounce
    parser, as it would have been."""
    kind = _kind(data)
    if kind in ("xml", "gzip", "zip"):
        return True
    if kind != "mail":
        return False
    try:
        if message_from_bytes(data[:65536], policy=policy.compat32).get_content_type() \
                == "multipart/report":
            return False
        parse_aggregate(data, max_size)
    except (DMARCError, RecursionError):
        return False
    return True


def _mb(size: int) -> str:
    return f"{size / 1048576:g} MB" if size >= 1048576 else f"{size} bytes"
