"""The SMTP intake listener, on aiosmtpd.

aiosmtpd does the protocol; this module adds what an MTA's edge needs on top: strict paths and
SMTPUTF8 (``postlane/address.py``), a checked EHLO name, DSN parameters (RFC 3461
ENVID/RET/NOTIFY/ORCPT, which aiosmtpd would refuse), the relay check, recipient limits,
``<postmaster>``, a 421 while the node drains, and a 250 only once the spool has the message on
disk. Who may relay, TLS, AUTH and the intake limits are ``guard.py``'s (AUTH's password checks
``auth.py``'s).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import unicodedata

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from ..address import PathError, alabel_domain, domain_key, parse_path
from ..config import ListenerConfig
from ..policy.headers import normalize_newlines
from ..policy.intake import Intake, RcptIn, Rejection
from .auth import Authenticator
from .guard import Guard, GuardedSMTP
from .protocol import QuickSMTP
from .tls import ServerCertificate

log = logging.getLogger("postlane.edge")

# Parameters the edge handles itself (aiosmtpd would refuse them): DSN (RFC 3461), MT-PRIORITY
# (RFC 6710) and AUTH (RFC 4954 5: a server offering AUTH accepts it; Postlane ignores it, as
# RFC 4954 allows for a submitter it does not trust to assert one).
_MAIL_OURS = frozenset({"ENVID", "RET", "MT-PRIORITY", "AUTH"})
_RCPT_OURS = frozenset({"NOTIFY", "ORCPT"})
_MAIL_KNOWN = _MAIL_OURS | {"SIZE", "BODY", "SMTPUTF8"}  # the rest are aiosmtpd's
# esmtp-keyword (RFC 5321 4.1.2), upper-cased: one not known is refused with 555 (aiosmtpd
# answered 501 "syntax" to one with a hyphen, X-FOO=1, as if it were malformed)
_KEYWORD = re.compile(r"[A-Z0-9][A-Z0-9-]*")
_PRIORITY = re.compile(r"[+-]?[0-9]")  # RFC 6710 priority-value, ASCII digits only
_XCHAR = r"[\x21-\x2a\x2c-\x3c\x3e-\x7e]*"
_XTEXT = re.compile(rf"^{_XCHAR}(\+[0-9A-F]{{2}}{_XCHAR})*$")
_XCODE = re.compile(r"\+([0-9A-F]{2})")
_END = b"\r\n.\r\n"
# A transparent dot (RFC 5321 4.5.2): the first character of a line, if a period, is taken off
# (a client stuffed it; one that did not loses it, as through Postfix, Exim and Sendmail), and a
# line ends at LF, bare or not: intake turns a bare LF into CRLF, and clients that send bare LFs
# stuff after them (Python's smtplib, ``sendmail`` of ``msg.as_bytes()``).
_STUFFED = b"\n."
_END_PREFIXES = (b"\r", b"\r\n", b"\r\n.", b"\r\n.\r")
# An EHLO/HELO name: LDH labels (with "_", which Windows host names carry, as Postfix allows), an
# address literal, or a bare address. It is written into the Received header: nothing else is.
_HELO_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                        r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")


_sanitized_log = aiosmtpd.smtp.sanitized_log
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def _log_if_enabled(func, msg, *args, **kwargs) -> None:
    """aiosmtpd's ``sanitized_log``, skipped when its level is off: aiosmtpd logs every
    command line at DEBUG and INFO through it, sanitizing (a regex per argument) before the
    logger looks at its level: 0.9 % of the node's profile samples in the bench."""
    level = _LEVELS.get(getattr(func, "__name__", ""))
    logger = getattr(func, "__self__", None)
    if level is not None and isinstance(logger, logging.Logger) and \
            not logger.isEnabledFor(level):
        return
    _sanitized_log(func, msg, *args, **kwargs)


aiosmtpd.smtp.sanitized_log = _log_if_enabled


def helo_name(text: str) -> str | None:
    """The EHLO/HELO argument as it may go into a header (U-labels as A-labels), or None."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        literal = text[1:-1]
        literal = literal[5:] if literal[:5].lower() == "ipv6:" else literal
    else:
        literal = text
    try:
        if "%" not in literal:  # no zone index (ip_address takes any text after a "%")
            ipaddress.ip_address(literal)
            return text
    except ValueError:
        pass
    if not text.isascii():
        try:
            text = alabel_domain(text)
        except PathError:
            return None
    return text if len(text) <= 253 and _HELO_NAME.fullmatch(text) else None


class ParamError(ValueError):
    """A parameter refused with the reply that is the exception's text."""


def _split_params(rest: str, ours: frozenset[str], known: frozenset[str]
                  ) -> tuple[str, dict[str, str]]:
    """The parameters after a path -> (those for aiosmtpd, those in ``ours`` and well-formed
    keywords not in ``known``, which the caller refuses with 555). Raises ParamError for a
    keyword given twice: aiosmtpd kept the last silently (RET=FULL RET=HDRS), where Postfix
    refuses (RFC 3461 4: each DSN parameter at most once). One of aiosmtpd's (SMTPUTF8, BODY,
    SIZE) repeated with the same value is taken once, as Postfix takes it: smtplib's
    ``send_message`` adds ``SMTPUTF8 BODY=8BITMIME`` after the caller's own options. Each of
    ``ours`` takes a value (``ENVID`` alone got 250)."""
    if not rest:  # most MAIL and RCPT commands
        return "", {}
    keep, mine = [], {}
    seen: dict[str, tuple[str, str]] = {}
    for param in rest.split():
        key, eq, value = param.partition("=")
        key = key.upper()
        if key in seen:
            if key in ours or seen[key] != (eq, value.upper()):
                raise ParamError(f"501 5.5.4 {key} given more than once")
            continue
        seen[key] = (eq, value.upper())
        if key in ours and not eq:
            raise ParamError(f"501 5.5.4 {key} needs a value")
        if key in ours or (key not in known and (value or not eq) and _KEYWORD.fullmatch(key)):
            mine[key] = value
        else:
            keep.append(param)
    return " ".join(keep), mine


def _unknown(params: dict[str, str], ours: frozenset[str]) -> str | None:
    """The 555 reply for a parameter not implemented here (RFC 5321 4.1.1.11), or None."""
    for key in params:
        if key not in ours:
            return f"555 5.5.4 {key} parameter not recognized or not implemented"
    return None


def _xtext(value: str, utf8: bool = False) -> bool:
    """RFC 3461 xtext; in an SMTPUTF8 transaction also UTF-8 (RFC 6533's unitext). An encoded
    control character (``+0D+0A``, ``+00``) is refused, as Postfix does: the DSN writes the
    decoded value into a field."""
    if utf8 and not any("\ud800" <= c <= "\udfff" for c in value):
        value = "".join(c if c.isascii() else "x" for c in value)
    return bool(_XTEXT.match(value)) and not any(
        int(code, 16) < 0x20 or int(code, 16) == 0x7F for code in _XCODE.findall(value))


def _orcpt_ok(value: str, utf8: bool) -> bool:
    """``addr-type ";" xtext`` (RFC 3461 4.2): it is sent on as given, and a strict next hop
    refuses the recipient (Postfix: 501 5.5.4 Bad ORCPT parameter syntax) of a message
    already acknowledged."""
    kind, sep, address = value.partition(";")
    return bool(sep and address and re.fullmatch(r"[A-Za-z0-9-]+", kind)
                and _xtext(address, utf8))


def _keyword(arg: str | None, keyword: str) -> str | None:
    """``FROM:<a@b> ...`` -> ``<a@b> ...`` (a space after the colon is tolerated)."""
    if arg is None or arg[:len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword):]


def has_long_line(data: bytes | bytearray, limit: int) -> bool:
    """Whether a CRLF-ended line of ``data`` is longer than ``limit`` - 2 bytes.

    Jumps to the last CRLF within each ``limit`` bytes instead of splitting into lines: 2 µs
    against 15 µs for a 10 KB message (``max(map(len, data.split(CRLF)))``). Any line that
    starts in a window and ends within it is short enough; a window without CRLF holds a long
    one."""
    pos, end = 0, len(data)
    while end - pos > limit:
        last = data.rfind(b"\r\n", pos, pos + limit)
        if last < 0:
            return True
        pos = last + 2
    return b"\r\n" not in data[pos:] and end - pos > limit - 2


class BulkDataSMTP(QuickSMTP):
    """aiosmtpd's SMTP reading DATA in blocks instead of line by line.

    Measured with py-spy on ``postlane bench`` (10 KB messages): aiosmtpd's per-line DATA loop was
    24 % of the node's CPU. One ``readuntil(CRLF.CRLF)`` reads most messages (6 µs for 10 KB);
    reading up to each ".CRLF" cost 119 µs for a body whose lines end with a full stop. Only
    CRLF.CRLF ends the data (a bare LF or CR never does: RFC 5321 4.1.1.4, CVE-2023-51766), and
    pipelined commands after it stay in the reader.
    """

    _held = b""
    max_line = 1000
    """Octets per line including CRLF, not counting a transparent dot (RFC 5321 4.5.3.1.6)."""
    max_header = 0
    """Octets of the header block (0: no limit)."""

    def check_content(self, content: bytes) -> str | None:
        """The refusal of a message read by DATA, or None: lines over ``max_line`` octets
        (500 5.5.2) and header blocks over ``max_header`` (552 5.3.4).

        Both are measured on the lines as intake stores and relays them, where a bare LF or CR
        ends a line (``normalize_newlines``): a message written with LF line endings
        (``smtplib.sendmail(..., msg.as_bytes())``, curl uploading a Unix file) was one "line"
        from CRLF to CRLF, refused as too long past 998 octets, and past ``max_header`` a
        header block without CRLF CRLF was refused as too large."""
        long_enough = len(content) > self.max_line - 2
        big_enough = bool(self.max_header) and len(content) > self.max_header
        if not (long_enough or big_enough):
            return None
        lines = normalize_newlines(content)  # without bare CR or LF: counts only, no copy
        if long_enough and has_long_line(lines, self.max_line) and not self.read_here():
            return "500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)"
        if big_enough:
            end = lines.find(b"\r\n\r\n", 0, self.max_header + 4)
            if end < 0 and not lines.startswith(b"\r\n"):
                return "552 5.3.4 Header block too large"
        return None

    def read_here(self) -> bool:
        """Whether the message is only for this node to read, never relayed (its long lines
        harm nobody)."""
        return False

    async def push(self, status: str | bytes) -> None:
        """Send a reply, or hold it while more is sure to follow at once.

        Held: a continuation line (``250-...``: aiosmtpd pushes a multi-line reply line by
        line, and EHLO's nine lines were nine writes, each a wake-up for the client), and a 250
        while the client's next command is already buffered (RFC 2920: a pipelined MAIL, RCPT,
        DATA then costs one write instead of three; the writes were 4 % of the node's CPU in
        ``postlane bench``). Any other reply, or reading that must wait for the client, sends
        what is held first, so a client never waits for a reply we hold; ``\\r\\n`` is what
        aiosmtpd's reader needs to go on without waiting. A continuation line stays held
        whatever its size: the reply's last line follows it without reading anything.
        """
        line = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") \
            if isinstance(status, str) else status
        response = self._held + line + b"\r\n"
        if line[3:4] == b"-":
            self._held = response
            return
        # asyncio's StreamReader keeps unread bytes in ``_buffer`` (no public peek exists)
        if line.startswith(b"250") and len(response) < 4096 and \
                b"\r\n" in self._reader._buffer:  # type: ignore[attr-defined]
            self._held = response
            return
        self._held = b""
        writer = self._writer
        writer.write(response)
        transport = self.transport
        if transport is None or transport.is_closing() or \
                transport.get_write_buffer_size():  # type: ignore[attr-defined]
            # drain() waits for a full buffer, and on a closing connection yields so that
            # connection_lost() runs and raises; with the buffer empty it returns at once
            await writer.drain()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Strict RFC 5321/6531 paths (``address.py``) instead of aiosmtpd's parser, which is
        the lenient header parser and builds a typing.Protocol class on every call (8 % of the
        node's CPU in the bench). ``<>`` stays ``"<>"``, aiosmtpd's spelling of it."""
        try:
            address, rest = parse_path(arg, utf8=True, null=True, postmaster=True)
        except PathError:
            return None, None
        return address or "<>", rest

    def _may_straddle(self, data: bytearray) -> bool:
        """Whether an end mark could begin in ``data`` and end in bytes not read yet: unknown
        until 4 bytes are buffered, else whether the 8 bytes around the seam hold one. Each
        message starts so (its DATA line's CRLF); this spares most a 1-byte read."""
        buffered = self._reader._buffer  # type: ignore[attr-defined]  # no public peek
        return len(buffered) < 4 or _END in bytes(data[-4:]) + bytes(buffered[:4])

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        limit = self.data_size_limit
        reader = self._reader
        buffered = reader._buffer  # type: ignore[attr-defined]  # no public peek
        data = bytearray(b"\r\n")  # the CRLF that ended the DATA line: "." alone is found too
        # RFC 1870 counts the message, not the wire: a transparent dot is not an octet of it
        size, stuffed, counted, too_big = 0, 0, 0, False
        while not data.endswith(_END):
            # readuntil(_END) misses an end mark that began in bytes already taken, so step
            # byte by byte while the data ends in a beginning of the mark (at the start, and
            # rarely after a limit overrun); otherwise one call reads to the end. A mark
            # already buffered is taken with readexactly: readuntil stops at the reader's
            # line limit and raised LimitOverrunError for every message over 1,000 octets.
            try:
                if data.endswith(_END_PREFIXES) and self._may_straddle(data):
                    chunk = await reader.readexactly(1)
                elif (end := buffered.find(_END)) >= 0:
                    chunk = await reader.readexactly(end + len(_END))
                else:
                    chunk = await reader.readuntil(_END)
            except asyncio.LimitOverrunError as exc:  # no mark in the buffer yet: take it all
                chunk = await reader.readexactly(exc.consumed)
            except asyncio.IncompleteReadError:
                return  # the client went away mid-DATA: nothing was acknowledged
            size += len(chunk)
            if too_big:
                data = data[-4:] + chunk  # keep only what finds the end mark
                continue
            data += chunk
            if limit and size - 3 > limit:  # counted only past the limit on the wire
                end = len(data) - 3 if data.endswith(_END) else len(data)  # not the end's dot
                stuffed += data.count(_STUFFED, counted, end)
                counted = end - 1  # a transparent dot and its LF are 2 bytes: none counted twice
            if limit and size - 3 - stuffed > limit:
                # read on to the end, keeping only what finds the end mark (all of it when
                # this chunk ended the data: 4 bytes cut it, and the read waited for more)
                too_big, data = True, data[-len(_END):]
        if too_big:
            self._set_post_data_state()
            await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
            return
        # the bytearray goes before the handler runs: kept (a local), it was a second copy
        # of the message through intake, signing and the spool write
        del data[-3:]  # ".\r\n"
        del data[:2]  # the CRLF of the DATA line
        content = bytes(data)
        data.clear()
        content = content.replace(_STUFFED, b"\n")  # the same object when nothing is stuffed
        if content.startswith(b"."):
            content = content[1:]
        refusal = self.check_content(content)
        if refusal:
            self._set_post_data_state()
            await self.push(refusal)
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)


class _CommandSizes(dict[str, int]):
    """The longest command line per verb: 512 octets (RFC 5321 4.5.3.1.4), MAIL and RCPT
    lengthened by the extensions offered (SIZE 26, SMTPUTF8 10, DSN 100 and 500, AUTH 500),
    AUTH's own line 12,288 (RFC 4954 4), all capped by the reader's line limit
    (``max_line_length``).

    aiosmtpd keeps these in one dict that every session shares, clears it when a session starts
    and adds SIZE's and SMTPUTF8's octets at each EHLO: a session's MAIL limit depended on how
    many clients had connected or said EHLO since its own EHLO, and RCPT never got DSN's 500.
    Its writes are ignored here."""

    def __missing__(self, verb: str) -> int:
        return 512

    def __setitem__(self, verb: str, size: int) -> None:
        pass

    def clear(self) -> None:
        pass


class EdgeSMTP(GuardedSMTP, BulkDataSMTP):
    """aiosmtpd's SMTP with strict paths, SMTPUTF8, DSN parameters and drain handling."""

    command_size_limits = _CommandSizes(MAIL=512 + 26 + 10 + 100 + 500, RCPT=512 + 500,
                                        AUTH=12288)

    def __init__(self, handler: SMTPIntake, **kwargs) -> None:
        super().__init__(handler, **kwargs)
        self.intake_handler = handler
        self.dsn_params: dict[str, str] = {}
        limits = handler.config.limits
        self.max_line, self.max_header = limits.max_line_length, limits.max_header_size

    def read_here(self) -> bool:
        """Reports to the node's own addresses (bounces, complaints, DMARC reports): GMX's and
        Amazon SES's come with lines over 998 octets, and refusing them lost the feedback."""
        feedback = self.intake_handler.intake.feedback
        rcpts = self.envelope.rcpt_tos if self.envelope is not None else []
        return feedback is not None and bool(rcpts) and all(
            feedback.is_report_address(r) for r in rcpts)

    async def _refuse_if_draining(self) -> bool:
        if self.intake_handler.draining:
            await self.push("421 4.3.2 Service shutting down, try again later")
            if self.transport is not None:
                self.transport.close()
            return True
        return False

    async def _path(self, body: str, refusal: str, ours: frozenset[str],
                    known: frozenset[str], **kind: bool
                    ) -> tuple[str, str, dict[str, str]] | None:
        """(address, parameters for aiosmtpd, those in ``ours``), or None after refusing the
        command: 553 5.6.7 when only SMTPUTF8 was missing, ``refusal`` and why for a bad path,
        501 for a parameter given twice."""
        try:
            address, rest = parse_path(body, **kind)
            return (address, *_split_params(rest, ours, known))
        except PathError as exc:
            await self.push("553 5.6.7 SMTPUTF8 is needed for a non-ASCII address" if exc.utf8
                            else f"{refusal}: {exc}")
        except ParamError as exc:
            await self.push(str(exc))
        return None

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        """The name checked (a CR or NUL here would go into Received: and on downstream) and
        in A-labels before aiosmtpd sees it: a bad one is refused before aiosmtpd resets the
        session, as RFC 5321 4.1.4 wants the state of before a refused EHLO kept (aiosmtpd
        dropped the transaction and ESMTP first: MAIL and RCPT answered 250 were gone)."""
        name = helo_name(hostname) if hostname else hostname  # none: aiosmtpd's syntax 501
        if hostname and name is None:
            await self.push("501 5.5.2 Invalid domain name in EHLO")
            return
        await super().smtp_EHLO(name)

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        """As ``smtp_EHLO``."""
        name = helo_name(hostname) if hostname else hostname  # none: aiosmtpd's syntax 501
        if hostname and name is None:
            await self.push("501 5.5.2 Invalid domain name in HELO")
            return
        await super().smtp_HELO(name)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._refuse_if_draining():
            return
        body = _keyword(arg, "FROM:")
        self.dsn_params = {}
        if body is not None and self.session is not None and self.session.host_name:
            utf8 = "SMTPUTF8" in body.upper().split()
            parsed = await self._path(body, "501 5.1.7 Bad sender address syntax", _MAIL_OURS,
                                      _MAIL_KNOWN, utf8=utf8, null=True)
            if parsed is None:
                return
            address, others, dsn = parsed
            if dsn:
                refusal = "501 5.5.4 Parameters need EHLO" if not self.session.extended_smtp \
                    else _unknown(dsn, _MAIL_OURS)
                if refusal:
                    await self.push(refusal)
                    return
            ret = dsn.get("RET")
            if ret is not None and ret.upper() not in ("FULL", "HDRS"):
                await self.push("501 5.5.4 RET must be FULL or HDRS")
                return
            prio = dsn.get("MT-PRIORITY")
            if prio is not None and not _PRIORITY.fullmatch(prio):
                await self.push("501 5.5.4 MT-PRIORITY must be an integer from -9 to 9")
                return
            envid = dsn.get("ENVID")
            if envid is not None and (not _xtext(envid) or len(envid) > 100):
                await self.push("501 5.5.4 ENVID is not valid xtext")
                return
            auth = dsn.pop("AUTH", None)
            if auth is not None and auth != "<>" and not (auth and _xtext(auth, utf8)):
                await self.push("501 5.5.4 AUTH must be <> or an address in xtext")
                return
            if not others.isascii():  # SIZE= and BODY= values (aiosmtpd's) are ASCII: its
                # isdigit() took "SIZE=١٢", and int() raised at "SIZE=²" (a traceback)
                await self.push("501 5.5.4 Parameter values must be ASCII")
                return
            self.dsn_params = dsn
            arg = f"FROM:<{address}> {others}".rstrip()
        await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._refuse_if_draining():
            return
        body = _keyword(arg, "TO:")
        self.dsn_params = {}
        if body is not None and self.envelope is not None and self.envelope.mail_from:
            utf8 = bool(self.envelope.smtp_utf8)
            parsed = await self._path(body, "501 5.1.3 Bad recipient address syntax", _RCPT_OURS,
                                      _RCPT_OURS, utf8=utf8, postmaster=True)
            if parsed is None:
                return
            address, others, dsn = parsed
            if dsn:
                refusal = "501 5.5.4 Parameters need EHLO" if not (
                    self.session and self.session.extended_smtp) else _unknown(dsn, _RCPT_OURS)
                if refusal:
                    await self.push(refusal)
                    return
            if "NOTIFY" in dsn:
                words = set(dsn["NOTIFY"].upper().split(","))
                if not words <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"} or (
                        "NEVER" in words and len(words) > 1):
                    await self.push("501 5.5.4 NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY")
                    return
            if "ORCPT" in dsn and not _orcpt_ok(dsn["ORCPT"], utf8):
                await self.push("501 5.5.4 ORCPT must be addr-type;xtext")
                return
            self.dsn_params = dsn
            arg = f"TO:<{address}> {others}".rstrip()
        await super().smtp_RCPT(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self._refuse_if_draining():
            return
        handler = self.intake_handler
        handler.transfers += 1
        handler.idle.clear()
        try:
            await super().smtp_DATA(arg)
        finally:
            handler.transfers -= 1
            if not handler.transfers:
                handler.idle.set()

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        """252 for any argument (RFC 5321 3.5.3 allows a user name, not only a path): aiosmtpd
        answered "502 Could not VRFY <arg>" to anything not a path, 502 saying the command is
        not implemented (4.2.4), echoing the argument, and counting as a bad command."""
        if await self.check_auth_needed("VRFY"):
            return
        await self.push("252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery"
                        if arg else "501 5.5.4 Syntax: VRFY <address>")
        await self._junk_command()


class SMTPIntake:
    """aiosmtpd handler of one listener."""

    def __init__(self, name: str, config: ListenerConfig, intake: Intake,
                 certificate: ServerCertificate | None = None,
                 auth: Authenticator | None = None, *, local_limits: bool = True) -> None:
        self.name = name
        self.config = config
        self.intake = intake
        self.draining = False
        """421 to new mail (``drain``)."""
        self.transfers = 0
        """Sessions inside DATA (receiving or storing a message): a drain waits for them."""
        self.idle = asyncio.Event()
        self.idle.set()
        self.guard = Guard(config, intake, certificate, auth, local_limits=local_limits)
        node = intake.config.node
        self.postmaster = node.postmaster or f"postmaster@{node.hostname}"
        feedback = intake.feedback
        self.postmaster_domains = {node.hostname.lower()} | (
            feedback.report_domains() if feedback is not None else set())
        """postmaster@ these is the postmaster (RFC 5321 4.5.1): the node's name, and the
        domains whose mail it takes itself (bounce, FBL, unsubscribe)."""
        classes = intake.config.classes
        self.postmaster_class = (config.default_class or intake.config.default_class
                                 or min(classes, key=lambda n: classes[n].priority))
        """Mail to the postmaster carries no class header: the listener's default, the
        node's, else the most urgent class (abuse and delivery reports from other operators
        are not to wait behind a campaign)."""

    def drain(self) -> None:
        """Refuse new mail with 421 from now on (the node or its worker is stopping), and
        say so now to the sessions waiting for a command."""
        self.draining = True
        self.guard.close_idle()

    async def finish(self, timeout: float) -> None:
        """After ``drain``: wait (at most ``timeout``) for the messages being received to
        be answered, then close their sessions too. Without it the node stopped its signer
        and spool under a client inside DATA, whose message got a 451 and came again."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), timeout)
        self.guard.close_idle()

    async def handle_exception(self, error: Exception) -> str:
        """The reply to a command whose handling raised: the node's fault (a store that
        failed at RCPT's suppression lookup, a statvfs at MAIL), so 451, as RFC 5321 4.2.1
        says of a local error. aiosmtpd answered ``500 Error: (OperationalError) ...``: a
        permanent syntax error that makes a peer bounce the recipient, counted toward the
        client's ``max_bad_commands``, in Python's words."""
        log.error("SMTP command failed: %s: %s", type(error).__name__, error, exc_info=error)
        return "451 4.3.0 Local error in processing, try again later"

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname  # checked, in A-labels (EdgeSMTP.smtp_EHLO)
        responses = self.guard.ehlo(responses)
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN", "250-MT-PRIORITY"]
        return responses[:-1] + extra + responses[-1:]

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        session.host_name = hostname  # checked, in A-labels (EdgeSMTP.smtp_HELO)
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: EdgeSMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        null = address == "<>"  # aiosmtpd's spelling of the null reverse-path
        refusal = self.guard.check_mail(session, "" if null else address, server.encrypted)
        if refusal is not None:
            return refusal
        envelope.mail_from = address  # kept as "<>" (aiosmtpd's RCPT needs it truthy)
        envelope.mail_options.extend(mail_options)
        envelope.dsn_mail = dict(server.dsn_params)  # type: ignore[attr-defined]
        envelope.rcpt_dsn = []  # type: ignore[attr-defined]
        envelope.rcpt_suppression = []  # type: ignore[attr-defined]
        envelope.rcpt_seen = set()  # type: ignore[attr-defined]
        envelope.to_postmaster = 0  # type: ignore[attr-defined]
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(self, server: EdgeSMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        local, _, domain = address.rpartition("@")
        postmaster = address.lower() == "postmaster" or (  # RFC 5321 4.5.1: from anyone
            local.lower() == "postmaster" and domain.lower() in self.postmaster_domains)
        if postmaster:
            address = self.postmaster
        feedback = self.intake.feedback
        report = not postmaster and feedback is not None and feedback.is_report_address(address)
        if not report and not postmaster:
            refusal = self.guard.check_rcpt(session)
            if refusal is not None:
                return refusal
        local, _, domain = address.rpartition("@")
        # exämple.com is xn--exmple-cua.com (RFC 5890), jörg precomposed is jörg decomposed
        # (RFC 6530 10.1: compared in NFC); the local part's case counts (RFC 5321 2.4)
        key = f"{unicodedata.normalize('NFC', local)}@{domain_key(domain)}"
        if key in envelope.rcpt_seen:  # type: ignore[attr-defined]
            return "250 2.1.5 Recipient ok (duplicate, delivered once)"
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return "452 4.5.3 Too many recipients"
        looked_up = (False, None)
        if feedback is not None and not report:
            refusal, hit = feedback.at_rcpt(address, self.config.default_class)
            if refusal:
                return refusal
            looked_up = (True, hit)
        envelope.rcpt_seen.add(key)  # type: ignore[attr-defined]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_suppression.append(looked_up)  # type: ignore[attr-defined]
        envelope.rcpt_dsn.append(dict(server.dsn_params))  # type: ignore[attr-defined]
        envelope.to_postmaster += postmaster  # type: ignore[attr-defined]
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        dsn = getattr(envelope, "dsn_mail", {})
        rcpt_dsn = getattr(envelope, "rcpt_dsn", [])
        looked_up = getattr(envelope, "rcpt_suppression", [])
        rcpts = []
        for i, addr in enumerate(envelope.rcpt_tos):
            params = rcpt_dsn[i] if i < len(rcpt_dsn) else {}
            checked, hit = looked_up[i] if i < len(looked_up) else (False, None)
            rcpts.append(RcptIn(addr, params.get("NOTIFY", "").upper(), params.get("ORCPT", ""),
                                checked, hit))
        peer = session.peer[0] if isinstance(session.peer, tuple) else ""
        feedback = self.intake.feedback
        reports = [r.address for r in rcpts if feedback and feedback.is_report_address(r.address)]
        if reports and feedback is not None:  # reports for the node itself: never relayed
            try:
                await feedback.receive(envelope.original_content or b"", reports, peer)
                await self.intake.spool.flush()  # its records are on disk before the 250
            except Exception:
                log.exception("report processing failed")
                return "451 4.3.0 Temporary failure processing the report, try again"
            rcpts = [r for r in rcpts if r.address not in reports]
            if not rcpts:
                return "250 2.0.0 Ok: report processed"
        auth_user = str(session.auth_data) if self.guard.user(session) else ""
        # only the postmaster: its class is ours to give, and another operator's report in
        # its own name is forwarded as it is (not signed by us, not refused for want of a key)
        # (of the recipients left once reports are taken out: a letter to the postmaster and
        # to a bounce address was classified as ordinary mail, and refused without a class)
        postmaster = getattr(envelope, "to_postmaster", 0) == len(rcpts)
        try:
            qid = await self.intake.submit(
                "" if envelope.mail_from == "<>" else envelope.mail_from or "", rcpts,
                envelope.original_content or b"",
                envid=dsn.get("ENVID", ""), ret=dsn.get("RET", "").upper(), listener=self.name,
                mt_priority=int(dsn["MT-PRIORITY"]) if "MT-PRIORITY" in dsn else None,
                client_ip=peer, client_name=session.host_name or "", auth_user=auth_user,
                default_class=self.config.default_class, smtputf8=bool(envelope.smtp_utf8),
                forced_class=self.postmaster_class if postmaster else None,
                src_type="postmaster" if postmaster else "smtp",
                protocol=_protocol(session, envelope, getattr(server, "encrypted", False),
                                   bool(auth_user)))
        except Rejection as exc:
            return exc.reply
        except Exception:  # never 250 what is not on disk
            log.exception("intake failed")
            return "451 4.3.0 Temporary failure storing the message, try again"
        return f"250 2.0.0 Ok: queued as {qid}"


def _protocol(session: Session, envelope: Envelope, encrypted: bool, authenticated: bool) -> str:
    """The Received field's "with": SMTP after HELO, else ESMTP or UTF8SMTP with S for TLS and
    A for AUTH (RFC 3848, RFC 6531)."""
    if not session.extended_smtp:
        return "SMTP"
    return (("UTF8SMTP" if envelope.smtp_utf8 else "ESMTP") + ("S" if encrypted else "")
            + ("A" if authenticated else ""))


class Listener:
    """One bound intake socket."""

    def __init__(self, name: str, config: ListenerConfig, intake: Intake, hostname: str,
                 certificate: ServerCertificate | None = None,
                 auth: Authenticator | None = None) -> None:
        self.name = name
        self.config = config
        self.handler = SMTPIntake(name, config, intake, certificate, auth)
        self.hostname = hostname
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config

        def factory() -> EdgeSMTP:
            return EdgeSMTP(self.handler, data_size_limit=cfg.max_message_size,
                            enable_SMTPUTF8=True, decode_data=False, hostname=self.hostname,
                            ident="Postlane ESMTP", loop=loop,
                            **self.handler.guard.smtp_options())

        self.server = await loop.create_server(factory, cfg.address, cfg.port, reuse_address=True,
                                               ssl=self.handler.guard.server_ssl,
                                               backlog=cfg.limits.listen_backlog)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def stop(self, timeout: float) -> None:
        """No new connections, 421 to new mail; messages being received finish (``timeout``)."""
        self.handler.drain()
        if self.server is not None:
            self.server.close()
        await self.handler.finish(timeout)
