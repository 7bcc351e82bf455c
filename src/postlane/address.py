"""SMTP paths (RFC 5321 4.1.2) with the internationalised forms of RFC 6531, parsed strictly.

aiosmtpd's parser is the e-mail header parser, which is lenient by design (``<a@b.example``
without its closing bracket was accepted). A path here is ``<>`` (MAIL only), ``<postmaster>``
(RCPT only), or ``<[@route,...:]local@domain>``, where the source route is accepted and dropped
(RFC 5321 4.1.1.3 and appendix C), the local part is a dot-string or a quoted string, and the
domain is LDH labels, an address literal or, in an SMTPUTF8 transaction, U-labels that must be
valid IDNA 2008 after UTS #46 mapping (case folded; the ``idna`` package). The angle brackets
may be left out, as Postfix allows by default (``strict_rfc821_envelopes = no``); when one is
there both must be.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata

import idna

__all__ = ["PathError", "address_key", "address_literal", "alabel_domain", "domain_key",
           "parse_path", "plain_ip", "spellings"]

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
# The common case, <ascii.dot-string@ldh.domain> with labels of at most 63 octets, in one match.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SIMPLE = re.compile(rf"<([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@((?:{_LABEL}\.)*{_LABEL})>")
_ATOM = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+")
_LDH = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
# Controls, C1 controls too, and the Unicode line and paragraph separators: Python's email
# package treats U+0085, U+2028 and U+2029 as line breaks and refuses them in a header, so a
# sender holding one got its message accepted and its bounce lost (build_bounce raised).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class PathError(ValueError):
    """A path that cannot be accepted; ``utf8`` says it would be fine with SMTPUTF8."""

    def __init__(self, why: str, utf8: bool = False) -> None:
        super().__init__(why)
        self.utf8 = utf8


def _surrogate(text: str) -> bool:
    """aiosmtpd decodes bytes that are not UTF-8 as lone surrogates."""
    return any("\ud800" <= c <= "\udfff" for c in text)


def _local_part(text: str) -> None:
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            raise PathError("unbalanced quotes in the local part")
        body, i = text[1:-1], 0
        while i < len(body):
            c = body[i]
            if c == "\\":
                if i + 1 >= len(body) or not " " <= body[i + 1] <= "~":
                    raise PathError("bad quoted pair in the local part")
                i += 2
                continue
            if c == '"' or (c.isascii() and not " " <= c <= "~"):
                raise PathError("bad character in the quoted local part")
            i += 1
        return
    if not text or any(not _ATOM.fullmatch(atom) for atom in text.split(".")):
        raise PathError("bad local part")


def check_domain(text: str) -> None:
    """A domain as a path may name it (raises PathError): also what a lane may be paused for."""
    if text.startswith("["):
        literal = text[1:-1] if text.endswith("]") else ""
        try:
            if "%" in literal:  # a zone index (IPv6Address takes any text after "%")
                raise ValueError(literal)
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise PathError("bad address literal") from None
        return
    if not text or len(text) > 255:
        raise PathError("bad domain")
    if text.endswith(".") and text[:-1] and not text[:-1].endswith("."):
        # DNS's root dot (example.com.) is no part of an SMTP Domain; refused saying so,
        # not stripped: the client still holds the message and can correct the address
        raise PathError("the domain ends with a trailing dot (RFC 5321 4.1.2): leave it out")
    for label in text.split("."):
        if label.isascii():
            if not _LDH.fullmatch(label) or len(label) > 63:
                raise PathError("bad domain")
            if label[:4].lower() == "xn--":
                try:
                    idna.decode(label.lower())
                except idna.IDNAError:
                    raise PathError("the domain has an A-label that is not valid IDNA") from None
    if not text.isascii():
        alabel_domain(text)


def alabel_domain(domain: str) -> str:
    """The ASCII (A-label) form of a domain, validated as IDNA 2008 (raises PathError)."""
    if domain.isascii():
        return domain.lower()
    try:
        # UTS #46 mapping first (case folding, width), then IDNA 2008, as Postfix does with
        # SMTPUTF8: domains are case-insensitive, and a@BÜCHER.example got 501 5.1.7
        return idna.encode(domain, uts46=True, transitional=False).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise PathError("the domain is not a valid internationalised name (IDNA 2008)") from None


@functools.lru_cache(maxsize=4096)
def domain_key(domain: str) -> str:
    """A domain as configured or given, in the form domains are compared in: lower case, in
    A-labels (``bücher.example`` and ``xn--bcher-kva.example`` are one domain, RFC 5890); a
    name that is not IDNA stays as it is, lower-cased."""
    try:
        return alabel_domain(domain)
    except PathError:
        return domain.lower()


def _forms(text: str) -> tuple[str, ...]:
    """``text`` as given, in NFC and in NFD, each once (ASCII has one form)."""
    if text.isascii():
        return (text,)
    return tuple(dict.fromkeys((text, unicodedata.normalize("NFC", text),
                                unicodedata.normalize("NFD", text))))


@functools.lru_cache(maxsize=4096)
def address_key(address: str) -> str:
    """The one form two spellings of a mailbox compare equal in: the local part lower-cased
    in NFC (``jörg`` precomposed and as ``o`` + U+0308 are canonically equivalent; RFC 6530
    10.1 and RFC 6532 3.1 ask for NFC), the domain as ``domain_key``. Only for comparing:
    what goes to the next hop stays as the client gave it."""
    local, at, domain = address.rpartition("@")
    if not at:
        return unicodedata.normalize("NFC", address.lower())
    return f"{unicodedata.normalize('NFC', local.lower())}@{domain_key(domain)}"


@functools.lru_cache(maxsize=4096)
def spellings(address: str) -> tuple[str, ...]:
    """The address with its domain as given, in A-labels and in U-labels, and a non-ASCII
    local part (or U-label) as given, in NFC and in NFD, each once (case as given): what to
    look an address up by where it is stored as a client spelled it (``jörg@exämple.com`` and
    ``jörg@xn--exmple-cua.com`` are one mailbox, RFC 5890; so are ``jörg`` precomposed and
    decomposed, RFC 6530 10.1)."""
    local, at, domain = address.rpartition("@")
    if not at or (address.isascii() and "xn--" not in domain.lower()):
        return (address,)  # the common case: one spelling
    if domain.isascii() and "xn--" not in domain.lower():
        domains: tuple[str, ...] = (domain,)
    else:
        alabel = domain_key(domain)
        try:
            ulabel = idna.decode(alabel)
        except (idna.IDNAError, UnicodeError):
            ulabel = domain
        domains = (*_forms(domain), alabel, *_forms(ulabel))
    return tuple(dict.fromkeys(f"{part}@{name}" for part in _forms(local)
                               for name in domains))


def _mailbox(text: str) -> str:
    at = text.rfind("@")
    if at <= 0:
        raise PathError("the address needs local-part@domain")
    local, domain = text[:at], text[at + 1:]
    _local_part(local)
    check_domain(domain)
    return text


def _split(arg: str) -> tuple[str, str, bool]:
    """(path without brackets, the parameters after it, whether it had brackets)."""
    if not arg.startswith("<"):
        if ">" in arg.partition(" ")[0]:
            raise PathError("unbalanced angle brackets")
        path, _, rest = arg.partition(" ")
        return path, rest, False
    end, quoted, i = -1, False, 1
    while i < len(arg):
        c = arg[i]
        if c == "\\" and quoted:
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            end = i
            break
        elif c == "<" and not quoted:
            break
        i += 1
    if end < 0:
        raise PathError("unbalanced angle brackets")
    rest = arg[end + 1:]
    if rest and not rest.startswith(" "):
        raise PathError("text after the closing angle bracket")
    return arg[1:end], rest.strip(" "), True


def parse_path(arg: str, *, utf8: bool, null: bool = False,
               postmaster: bool = False) -> tuple[str, str]:
    """``<path> params`` -> (address, params). The address is ``""`` for ``<>`` (when ``null``),
    ``postmaster`` for ``<Postmaster>`` (when ``postmaster``), else ``local@domain`` without a
    source route. Raises PathError; ``PathError.utf8`` marks a path that only SMTPUTF8 allows
    (``utf8`` False: 553 5.6.7 rather than a syntax error)."""
    arg = arg.lstrip(" ")
    match = _SIMPLE.match(arg)
    if match is not None:  # the common case; A-labels go the long way, to be checked
        end = match.end()
        rest = arg[end:]
        if (not rest or rest[0] == " ") and end <= 256 and not (
                "-" in match.group(2) and "xn--" in match.group(2).lower()):
            return arg[1:end - 1], rest.strip(" ")
    path, rest, bracketed = _split(arg)
    if _surrogate(path):
        raise PathError("the address is not valid UTF-8")
    if _CONTROL.search(path):
        raise PathError("control character in the address")
    if bracketed and path == "":
        if not null:
            raise PathError("the null path <> is only for MAIL FROM")
        return "", rest
    if postmaster and path.lower() == "postmaster":
        return "postmaster", rest
    if path.startswith("@"):  # a source route: accepted and ignored (RFC 5321 C)
        route, colon, path = path.partition(":")
        if not colon:
            raise PathError("source route without ':'")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise PathError("bad source route")
            check_domain(hop[1:])
    address = _mailbox(path)
    if len(address.encode("utf-8")) > 254:
        raise PathError("the address is too long")
    if not address.isascii() and not utf8:
        raise PathError("a non-ASCII address needs the SMTPUTF8 parameter", utf8=True)
    return address, rest


@functools.lru_cache(maxsize=4096)  # per message, from few clients: parsing was 0.8 % of the loop
def address_literal(ip: str) -> str | None:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``: an IP as RFC 5321 4.1.3 writes it in a
    Received field's TCP-info (4.4), or None when ``ip`` is no IP address. An IPv4-mapped IPv6
    address (``::ffff:192.0.2.1``, an IPv4 client of a dual-stack socket) is the IPv4 one."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is None:
            return f"[IPv6:{address.compressed}]"
        address = address.ipv4_mapped
    return f"[{address}]"


def plain_ip(ip: str) -> str:
    """An IPv4 client of a dual-stack socket (the API on ``::``) as its IPv4 address, not
    ``::ffff:192.0.2.1``, so records name it as an IPv4 socket would; anything else as is."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped) if mapped is not None else ip
