"""Asyncio outbound SMTP client for the relay.

Hand-written rather than built on aiosmtplib because aiosmtplib has no RFC 2920 PIPELINING,
and at ~1,000 messages/s the round trips saved by sending MAIL, every RCPT and DATA in one
write dominate delivery throughput.

Defences built in: message data is normalised to CRLF line endings before dot-stuffing, so a
bare LF or CR can never form an end-of-data sequence the receiver reads differently from us
(SMTP smuggling, CVE-2023-51766); plaintext bytes pipelined behind a STARTTLS reply are
refused (CVE-2011-0411 style injection); replies are capped in lines and bytes so a hostile
server cannot make us buffer megabytes (what is past the caps is read and dropped, so a long
reply is still the reply it is, and the reply's deadline ends one that never ends).

SMTPUTF8 (RFC 6531): an envelope with non-ASCII addresses, or a header with UTF-8 (RFC 6532),
goes with the SMTPUTF8 parameter to a server that offers it. To one that does not: a message
that asked for SMTPUTF8 (``send(smtputf8=True)``) and has UTF-8 in its header cannot be sent
(RFC 6531 3.2; we do not downgrade): every recipient gets a 550 5.6.7 made here, as Postfix's
"SMTPUTF8 is required, but was not offered by host"; otherwise domains are sent as A-labels,
and an address whose local part is not ASCII cannot be sent at all: its recipient (or, for the
sender, the whole transaction) gets a 553 5.6.7 made here, so it bounces instead of being
retried forever. Likewise a message the EHLO says the server cannot take (over its SIZE, 8-bit
without 8BITMIME) is refused here and never sent, not converted (a conversion would break its
DKIM signature). UTF-8 headers in mail that did not ask for SMTPUTF8 go as they are to a
server with 8BITMIME (docs/security.md, as Postfix does).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field

from ..address import PathError, alabel_domain
from ..streams import pending_bytes

__all__ = ["Reply", "SMTPConnection", "SMTPError", "Timeouts", "Transaction"]

MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 64 * 1024
# StreamReader buffer limit: a single line longer than this is read in parts of this size.
_STREAM_LIMIT = MAX_REPLY_BYTES
_LONG_LINE_KEPT = 1000
"""Of a reply line longer than the stream limit, the bytes kept (its code, and text enough to
say why: a record's diagnostic)."""
# Large messages are written in blocks so the RFC 5321 data-block timeout applies per block.
_DATA_BLOCK = 256 * 1024

_ENHANCED_RE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)", re.ASCII)
_DSN_MAIL_PARAMS = ("ENVID=", "RET=")
_DSN_RCPT_PARAMS = ("NOTIFY=", "ORCPT=")


@dataclass(slots=True)
class Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    text: str
    enhanced: str | None = None

    def __str__(self) -> str:
        first = self.text.split("\n", 1)[0]
        return f"{self.code} {first}" if first else str(self.code)

    @property
    def is_ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_temp(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_perm(self) -> bool:
        return 500 <= self.code < 600


class SMTPError(Exception):
    """A failure before or outside a transaction's replies: connect refused/timeout, TLS
    failure, bad greeting, garbage reply, closed connection."""

    def __init__(
        self, stage: str, message: str, reply: Reply | None = None, temporary: bool = True,
        tls_failure: str = "",
    ) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message
        self.reply = reply
        self.temporary = temporary
        self.tls_failure = tls_failure
        """For a TLS failure, its RFC 8460 result type (``starttls-not-supported``,
        ``certificate-expired`` ...)."""


@dataclass(slots=True)
class Timeouts:
    """Per-stage timeouts in seconds (RFC 5321 4.5.3.2 gives the recommended minimums)."""

    connect: float = 30.0
    banner: float = 60.0  # RFC 5321 4.5.3.2 gives 5 min; we default shorter, configurable
    command: float = 60.0
    data_block: float = 180.0
    dot: float = 600.0


@dataclass(slots=True)
class Transaction:
    """Replies of one mail transaction.

    A recipient was delivered iff its RCPT reply and ``data_reply`` are both 2xx.
    ``data_reply`` is None exactly when no recipient was accepted; when MAIL was refused,
    every entry of ``rcpt_replies`` is the MAIL reply, so the list always has one reply per
    recipient to account with.
    """

    mail_reply: Reply
    rcpt_replies: list[Reply] = field(default_factory=list)
    data_reply: Reply | None = None


def _parse_reply(lines: list[bytes], stage: str) -> Reply:
    if len(lines) == 1:
        return _parse_line(lines[0], stage)
    texts: list[str] = []
    code = 0
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        _check_line(line, stage)
        if not code:
            code = int(line[:3])
        elif int(line[:3]) != code:  # RFC 5321 4.2.1: which one would be the answer?
            raise SMTPError(stage, f"reply lines with different codes {line[:80]!r}")
        texts.append(line[4:].decode("utf-8", "replace"))
    return Reply(code, "\n".join(texts), _enhanced(texts[0], code))


def _parse_line(raw: bytes, stage: str) -> Reply:
    """A one-line reply (most are): ``_parse_reply`` without its lists."""
    line = raw.rstrip(b"\r\n")
    _check_line(line, stage)
    code = int(line[:3])
    text = line[4:].decode("utf-8", "replace")
    return Reply(code, text, _enhanced(text, code))


def _check_line(line: bytes, stage: str) -> None:
    if (
        len(line) < 3
        or not line[:3].isdigit()
        or line[0] not in b"2345"
        or (len(line) > 3 and line[3] not in b" -")
    ):
        raise SMTPError(stage, f"malformed reply line {line[:80]!r}")


def _enhanced(text: str, code: int) -> str | None:
    """The enhanced code (RFC 3463) the reply's text starts with, if of the reply's class."""
    m = _ENHANCED_RE.match(text)
    return m.group(0) if m and m.group(1) == str(code)[0] else None


def crlf_text(data: bytes, crlf: bool = False) -> bytes:
    """``data`` with every bare CR or LF made CRLF, so that no bare CR/LF can be read as
    end-of-data by a lenient receiver (the same object when there is none). ``crlf`` says the
    caller knows there is none (spooled mail: intake normalised it), which saves three scans,
    16 µs of a 10 KB message's 23 µs here."""
    if not crlf and not (data.count(b"\n") == data.count(b"\r") == data.count(b"\r\n")):
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return data


def stuffed_blocks(text: bytes, block: int = _DATA_BLOCK) -> Iterator[bytes | memoryview]:
    """The DATA wire form of ``text`` (CRLF line ends only: ``crlf_text``) in blocks of about
    ``block`` bytes: every dot that begins a line doubled (RFC 5321 4.5.2), a CRLF added after
    a last line without one, no final ".\r\n". A block with no dot to stuff is a view of
    ``text``, one with is stuffed alone: stuffing the whole message made a copy of it (25 MB
    for a 25 MB message) for as long as it was being sent."""
    size = len(text)
    if text.startswith(b"."):
        yield b"."
    start = 0
    while start < size:
        end = min(start + block, size)
        # never cut a CRLF "." in two: move the cut past it (a block then holds all of it)
        while end < size and (text[end - 1] == 13 or text[end - 2:end] == b"\r\n"):
            end += 1
        if text.find(b"\r\n.", start, end) >= 0:
            yield text[start:end].replace(b"\r\n.", b"\r\n..")
        else:
            yield memoryview(text)[start:end]
        start = end
    if size and not text.endswith(b"\r\n"):
        yield b"\r\n"


def prepare_data(data: bytes, crlf: bool = False) -> bytes:
    """A message's whole DATA wire form (CRLF-normalised, dot-stuffed, without the final
    ".\r\n"); ``send`` writes ``stuffed_blocks`` instead, block by block."""
    return b"".join(stuffed_blocks(crlf_text(data, crlf)))


def message_size(text: bytes) -> int:
    """RFC 1870's size of ``text`` (``crlf_text``) as ``stuffed_blocks`` sends it: its octets
    and a last CRLF when it lacks one, without the transparent dots (RFC 1870 3)."""
    return len(text) + (2 if text and not text.endswith(b"\r\n") else 0)


def _header(payload: bytes) -> bytes:
    """The header block of a message in wire form (all of it when there is no blank line)."""
    end = payload.find(b"\r\n\r\n")
    return payload if end < 0 else payload[:end]


def _strip_params(params: str, drop: tuple[str, ...]) -> str:
    return " ".join(p for p in params.split() if not p.upper().startswith(drop))


class SMTPConnection:
    """One outbound SMTP session; run one transaction at a time on it."""

    peer_ip: str
    peer_port: int
    source_ip: str | None
    server_name: str
    banner: Reply
    ehlo_reply: Reply
    extensions: dict[str, str]
    size_limit: int
    """The server's SIZE (RFC 1870), 0 for none."""
    tls_version: str | None
    tls_cipher: str | None
    tls_auth: str
    """How the server was authenticated: "" (no TLS), "none", "pkix", "dane-ee", "dane-ta"."""
    tls_policy: str
    """The TLS policy the connection was made under (opportunistic, required, verified,
    mta-sts-enforce, mta-sts-testing, dane, tlsrpt): evidence for the accounting records."""
    messages_sent: int
    transactions: int
    """Transactions the server answered to their end on this connection, delivered or not,
    with the session still open after them (no 421)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        server_name: str,
        source_ip: str | None,
        ehlo_name: str,
        timeouts: Timeouts,
        sni: str | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._timeouts = timeouts
        self._ehlo_name = ehlo_name
        self._usable = True
        self._busy = False
        peer = writer.get_extra_info("peername") or ("", 0)
        self.peer_ip, self.peer_port = peer[0], peer[1]
        self.source_ip = source_ip
        self.server_name = server_name
        self._sni = sni or server_name
        self.banner = Reply(0, "")
        self.ehlo_reply = Reply(0, "")
        self.extensions = {}
        self.size_limit = 0
        self.tls_version = None
        self.tls_cipher = None
        self.tls_auth = ""
        self.tls_policy = ""
        self.messages_sent = 0
        self.transactions = 0
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        server_name: str,
        source_ip: str | None,
        ehlo_name: str,
        tls: str = "opportunistic",
        timeouts: Timeouts | None = None,
        ssl_context: ssl.SSLContext | None = None,
        sni: str | None = None,
    ) -> SMTPConnection:
        """Connect, read the greeting, EHLO and (per ``tls``) STARTTLS + EHLO again.

        ``tls`` is "opportunistic" (STARTTLS when advertised; a refused STARTTLS command
        continues in plaintext, a failed handshake raises), "required" or "disabled".
        ``ssl_context`` (default: encryption without certificate checks) may verify the
        server's certificate for ``server_name``; a failed check raises SMTPError with its
        ``tls_failure``. ``sni``: the name sent in the TLS SNI extension when it is not
        ``server_name`` (DANE: the TLSA records' base domain, RFC 7672 8.1).
        """
        if tls not in ("opportunistic", "required", "disabled"):
            raise ValueError(f"tls must be opportunistic, required or disabled, not {tls!r}")
        t = timeouts or Timeouts()
        try:
            async with asyncio.timeout(t.connect):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    local_addr=(source_ip, 0) if source_ip else None,
                    limit=_STREAM_LIMIT,
                )
        except TimeoutError:
            raise SMTPError("connect", f"timed out connecting to {host}:{port}") from None
        except OSError as e:
            raise SMTPError("connect", f"{host}:{port}: {e.strerror or e}") from e
        conn = cls(
            reader,
            writer,
            server_name=server_name,
            source_ip=source_ip,
            ehlo_name=ehlo_name,
            timeouts=t,
            sni=sni,
        )
        try:
            await conn._handshake(tls, ssl_context)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _handshake(self, tls: str, ssl_context: ssl.SSLContext | None) -> None:
        banner = await self._read_reply("banner", self._timeouts.banner)
        self.banner = banner
        if not banner.is_ok:
            # RFC 5321 3.1: after a 554 greeting the client should QUIT.
            await self.quit()
            raise SMTPError(
                "banner", f"greeting refused: {banner}", banner, temporary=not banner.is_perm
            )
        await self._ehlo()
        if tls == "disabled":
            return
        if "STARTTLS" not in self.extensions:
            if tls == "required":
                raise SMTPError("starttls", f"{self.server_name} does not offer STARTTLS",
                                tls_failure="starttls-not-supported")
            return
        reply = await self._command("starttls", b"STARTTLS\r\n")
        if reply.code != 220:
            if tls == "required" or reply.code == 421:
                raise SMTPError("starttls", f"STARTTLS refused: {reply}", reply,
                                tls_failure="starttls-not-supported")
            return  # opportunistic: the session goes on in plaintext (RFC 3207 4.1)
        if pending_bytes(self._reader):  # the server's reply was not the last thing it sent
            raise SMTPError("starttls", "plaintext data pipelined after STARTTLS reply",
                            tls_failure="validation-failure")
        ctx = ssl_context or unverified_context()
        try:
            async with asyncio.timeout(self._timeouts.command):
                await self._writer.start_tls(ctx, server_hostname=self._sni)
        except TimeoutError:
            raise SMTPError("starttls", "TLS handshake timed out",
                            tls_failure="validation-failure") from None
        except (ssl.SSLError, OSError) as e:
            raise SMTPError("starttls", f"TLS handshake failed: {e}",
                            tls_failure=_tls_failure(e)) from e
        ssl_object = self._writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.tls_version = ssl_object.version()
            cipher = ssl_object.cipher()
            self.tls_cipher = cipher[0] if cipher else None
        await self._ehlo()

    async def _ehlo(self) -> None:
        name = self._ehlo_name.encode("ascii")
        reply = await self._command("ehlo", b"EHLO " + name + b"\r\n")
        if not reply.is_ok and reply.code != 421:
            # A server that will not take EHLO (RFC 5321 4.1.4: 500, 501, 502 or 550) gets
            # HELO and no extensions, as Postfix does for any refusal but 421 (closing): only
            # 500 and 502 were, and a 550 to EHLO bounced the batch unsent.
            reply = await self._command("ehlo", b"HELO " + name + b"\r\n")
        if not reply.is_ok:
            raise SMTPError("ehlo", f"EHLO refused: {reply}", reply, temporary=not reply.is_perm)
        self.ehlo_reply = reply
        extensions: dict[str, str] = {}
        for line in reply.text.split("\n")[1:]:
            keyword, _, params = line.strip().partition(" ")
            if keyword:
                extensions[keyword.upper()] = params.strip()
        self.extensions = extensions
        size = extensions.get("SIZE", "")
        # 20 digits are more than any message: a longer SIZE is no limit too (int() refuses
        # strings of over 4,300 digits, and a ValueError here failed the whole attempt)
        self.size_limit = int(size) if size.isdigit() and size.isascii() and len(size) <= 20 \
            else 0

    def peer_chain(self) -> list[bytes]:
        """The certificates the server sent (DER, its own first); [] without TLS."""
        ssl_object = self._writer.get_extra_info("ssl_object")
        if ssl_object is None:
            return []
        # Python 3.11 has no public way to the chain (3.13's SSLSocket.get_unverified_chain);
        # the method of the underlying _ssl object is the same one. DANE needs it.
        chain = ssl_object._sslobj.get_unverified_chain() or []
        return [ssl.PEM_cert_to_DER_cert(cert.public_bytes()) for cert in chain]

    @property
    def usable(self) -> bool:
        """Whether another transaction may run on this connection: not when the server has
        sent something unasked (a stray reply would be read as the next MAIL's, and every
        reply after it as the one before's) or hung up."""
        return (self._usable and not self._writer.is_closing()
                and not pending_bytes(self._reader) and not self._reader.at_eof())

    async def send(
        self,
        mail_from: str,
        rcpts: list[tuple[str, str]],
        data: bytes,
        mail_params: str = "",
        crlf: bool = False,
        before_dot: Awaitable[object] | None = None,
        smtputf8: bool = False,
    ) -> Transaction:
        """Run one mail transaction, pipelined when the server offers PIPELINING.

        ``rcpts`` holds (address, extra RCPT parameters). DSN parameters (ENVID, RET, NOTIFY,
        ORCPT) are dropped when the server does not advertise DSN, since such servers reject
        them (RFC 3461 4); the caller checks ``extensions`` to know it must report success
        itself. A 421 marks the connection unusable; the recipients it answered (and the
        data_reply if any recipient had been accepted) carry the 421. Network failures and
        malformed replies raise SMTPError and leave the connection closed; past the MAIL reply
        and before the message data they end the transaction instead (``_cut_short``): the
        refusals read stand, the rest get ``451 4.4.2``. ``crlf``: see
        ``prepare_data``. ``before_dot`` is awaited after the message's last block and before
        the final dot (which is when the remote side takes it): if it fails, the dot is never
        sent (SMTPError, connection closed) and the message is not delivered. ``smtputf8``: the
        message asked for SMTPUTF8 (``Message.smtputf8``), so UTF-8 in its header cannot go to
        a server without it.
        """
        if not rcpts:
            raise ValueError("send() needs at least one recipient")
        if self._busy:
            raise RuntimeError("one transaction at a time per SMTPConnection")
        if not self.usable:
            raise SMTPError("mail", "connection is not usable")
        payload = crlf_text(data, crlf)  # stuffed block by block as it is written
        n, kept = len(rcpts), None
        unsendable = self._unsendable(payload)
        if unsendable is None and smtputf8 and "SMTPUTF8" not in self.extensions \
                and not _header(payload).isascii():
            unsendable = Reply(550, "5.6.7 SMTPUTF8 is required, but was not offered by host"
                                    f" {self.server_name}[{self.peer_ip}]", "5.6.7")
        if unsendable is not None:
            return Transaction(unsendable, [unsendable] * n, None)
        if "SMTPUTF8" not in self.extensions and not (
                mail_from.isascii() and all(addr.isascii() for addr, _ in rcpts)):
            refusal = Reply(553, f"5.6.7 {self.server_name} does not support SMTPUTF8 and"
                                 " the address's local part is not ASCII", "5.6.7")
            sender = _ascii_address(mail_from)
            if sender is None:
                return Transaction(refusal, [refusal] * n, None)
            downgraded = [(_ascii_address(addr), params) for addr, params in rcpts]
            kept = [i for i, (addr, _) in enumerate(downgraded) if addr is not None]
            if not kept:
                return Transaction(Reply(250, "2.0.0 nothing to send", "2.0.0"),
                                   [refusal] * n, None)
            mail_from = sender
            rcpts = [(str(downgraded[i][0]), downgraded[i][1]) for i in kept]
        commands = self._mail_commands(mail_from, rcpts, payload, mail_params)
        self._busy = True
        try:
            tx = await self._send(commands, payload, before_dot)
            if self._usable:  # not a 421, nor the session lost
                self.transactions += 1
        except BaseException:
            # A failure mid-transaction leaves the stream out of sync: never reuse it.
            self.close()
            raise
        finally:
            self._busy = False
        if kept is not None and len(kept) < n:  # put the 553s back in the recipients' order
            replies = [refusal] * n
            for i, reply in zip(kept, tx.rcpt_replies, strict=True):
                replies[i] = reply
            tx.rcpt_replies = replies
        return tx

    def _unsendable(self, payload: bytes) -> Reply | None:
        """The refusal, made here, of a message this server's EHLO says it cannot take, so
        that it is never sent: larger than its SIZE (RFC 1870 6), 8-bit (body or headers) to
        a server without 8BITMIME or SMTPUTF8 (RFC 6152 3: we do not convert)."""
        ext = self.extensions
        limit = self.size_limit
        if limit and limit < (size := message_size(payload)):
            return Reply(552, f"5.3.4 message of {size} bytes exceeds the {limit} bytes"
                              f" {self.server_name} accepts (SIZE)", "5.3.4")
        if "8BITMIME" in ext or "SMTPUTF8" in ext or payload.isascii():
            return None
        return Reply(554, f"5.6.3 {self.server_name} does not support 8BITMIME and the"
                          " message is 8-bit", "5.6.3")

    def _mail_commands(
        self, mail_from: str, rcpts: list[tuple[str, str]], payload: bytes, mail_params: str
    ) -> list[bytes]:
        """The MAIL and RCPT command lines, encoded once (UTF-8)."""
        ext = self.extensions
        dsn = "DSN" in ext
        given = mail_params.upper()
        params: list[str] = []
        if "SIZE" in ext and "SIZE=" not in given:
            params.append(f"SIZE={message_size(payload)}")
        if "8BITMIME" in ext and "BODY=" not in given and not payload.isascii():
            params.append("BODY=8BITMIME")
        utf8 = "SMTPUTF8" in ext and not (
            mail_from.isascii() and all(addr.isascii() for addr, _ in rcpts)
            and _header(payload).isascii()
        )
        if utf8:
            params.append("SMTPUTF8")
        if mail_params:
            params.append(mail_params if dsn else _strip_params(mail_params, _DSN_MAIL_PARAMS))
        tail = " ".join(p for p in params if p)
        commands = [f"MAIL FROM:<{mail_from}>{' ' if tail else ''}{tail}\r\n".encode()]
        for addr, rparams in rcpts:
            if rparams and not dsn:
                rparams = _strip_params(rparams, _DSN_RCPT_PARAMS)
            if not utf8 and not rparams.isascii():
                rparams = " ".join(map(_ascii_param, rparams.split(" ")))
            commands.append(f"RCPT TO:<{addr}>{' ' if rparams else ''}{rparams}\r\n".encode())
        joined = b"".join(commands)
        if joined.count(b"\n") != len(commands) or joined.count(b"\r") != len(commands):
            raise ValueError("CR or LF in an envelope address or parameter")
        return commands

    async def _send(self, commands: list[bytes], payload: bytes,
                    before_dot: Awaitable[object] | None) -> Transaction:
        n = len(commands) - 1
        cmd_timeout = self._timeouts.command
        mail_reply: Reply | None = None
        rcpt_replies: list[Reply] = []
        try:
            if "PIPELINING" in self.extensions:
                self._writer.write(b"".join(commands) + b"DATA\r\n")
                await self._drain("mail", cmd_timeout)
                mail_reply = await self._read_reply("mail", cmd_timeout)
                if mail_reply.code == 421:
                    self._usable = False
                    return Transaction(mail_reply, [mail_reply] * n, None)
                for _ in range(n):
                    reply = await self._read_reply("rcpt", cmd_timeout)
                    rcpt_replies.append(reply)
                    if reply.code == 421:
                        return self._closing(mail_reply, rcpt_replies, n)
                data_cmd_reply = await self._read_reply("data", cmd_timeout)
            else:
                mail_reply = await self._command("mail", commands[0])
                _in_step("mail", mail_reply)
                if not mail_reply.is_ok:
                    if mail_reply.code == 421:
                        self._usable = False
                    else:
                        await self._quiet_rset()
                    return Transaction(mail_reply, [mail_reply] * n, None)
                for command in commands[1:]:
                    reply = await self._command("rcpt", command)
                    rcpt_replies.append(reply)
                    _in_step("rcpt", reply)
                    if reply.code == 421:
                        return self._closing(mail_reply, rcpt_replies, n)
                if not any(r.is_ok for r in rcpt_replies):
                    await self._quiet_rset()
                    return Transaction(mail_reply, rcpt_replies, None)
                data_cmd_reply = await self._command("data", b"DATA\r\n")
        except SMTPError as exc:
            if mail_reply is None:  # lost at MAIL: the caller's to tell (the next host)
                raise
            return self._cut_short(mail_reply, rcpt_replies, n, exc)

        accepted = mail_reply.is_ok and any(r.is_ok for r in rcpt_replies)
        if not mail_reply.is_ok:
            rcpt_replies = [mail_reply] * n
        if data_cmd_reply.code == 354:
            if not accepted:
                # Server wants data though nobody is to receive it: end it empty (its reply,
                # or none, changes no recipient's: the refusals stand).
                try:
                    self._writer.write(b".\r\n")
                    await self._drain("dot", cmd_timeout)
                    await self._read_reply("dot", self._timeouts.dot)
                except SMTPError:
                    self.close()
                return Transaction(mail_reply, rcpt_replies, None)
            await self._write_data(payload, before_dot)
            data_reply = await self._read_reply("dot", self._timeouts.dot)
            if data_reply.code == 421 or (data_reply.code < 400 and not data_reply.is_ok):
                self._usable = False  # a 3xx to the dot: the server is not where we are
            elif data_reply.is_ok:
                self.messages_sent += 1
            return Transaction(mail_reply, rcpt_replies, data_reply)
        if data_cmd_reply.code < 400:  # 2xx/3xx other than 354: the data was never sent,
            # and the replies are out of step with the commands (a stray reply ahead of the
            # MAIL's shifts each onto the next command): none read can be trusted, not even
            # a refusal, so no recipient is refused on them (the caller defers them all)
            raise SMTPError("data", f"unexpected reply to DATA: {data_cmd_reply}")
        if data_cmd_reply.code == 421:
            self._usable = False
        else:
            if pending_bytes(self._reader):  # one more reply came: read it, send no RSET
                self._usable = False
                try:
                    after: Reply | None = await self._read_reply("data", cmd_timeout)
                except SMTPError:
                    after = None
            else:
                after = await self._quiet_rset()
            if after is not None and 300 <= after.code < 400:
                # DATA's real 354, after DATA's reply: every reply was the one to the command
                # before (a stray reply ahead of the MAIL's), so none read can be trusted (a
                # stray 550 bounced recipients the server had accepted). (A 421 there is a
                # server closing after its error limit: the refusals stand.)
                raise SMTPError("data", f"replies out of step with the commands: {after}"
                                        " after the reply to DATA")
        return Transaction(mail_reply, rcpt_replies, data_cmd_reply if accepted else None)

    def _cut_short(self, mail_reply: Reply, rcpt_replies: list[Reply], n: int,
                   exc: SMTPError) -> Transaction:
        """The session lost (closed, timed out, garbled) after the MAIL reply and before any
        message data: the refusals read stand, as they would without PIPELINING (a server
        that refuses and hangs up, as blocklist checks do, refused; the close before the
        replies to the commands pipelined behind read as the session lost, and the refusal
        was deferred to be retried until the expiry). The recipients not answered, or
        accepted, get the loss as a ``451 4.4.2``. The connection is closed."""
        self.close()
        if not mail_reply.is_ok:
            return Transaction(mail_reply, [mail_reply] * n, None)
        lost = Reply(451, f"4.4.2 {exc}", "4.4.2")
        replies = rcpt_replies + [lost] * (n - len(rcpt_replies))
        return Transaction(mail_reply, replies, lost if any(r.is_ok for r in replies) else None)

    def _closing(self, mail_reply: Reply, rcpt_replies: list[Reply], n: int) -> Transaction:
        """Build the result of a transaction cut short by a 421 to a RCPT."""
        self._usable = False
        last = rcpt_replies[-1]
        rcpt_replies.extend([last] * (n - len(rcpt_replies)))
        accepted = any(r.is_ok for r in rcpt_replies)
        return Transaction(mail_reply, rcpt_replies, last if accepted else None)

    async def _write_data(self, payload: bytes, before_dot: Awaitable[object] | None) -> None:
        """Write ``payload`` (``crlf_text``) dot-stuffed, then the final dot."""
        timeout = self._timeouts.data_block
        if len(payload) <= _DATA_BLOCK and _settled(before_dot):
            self._check_quiet()
            # One block and nothing to wait for before the dot: the message and its end mark
            # go in one write (a loopback write costs the receiver's TCP path in our system
            # call: the dot alone was 1.3 % of the node's profile samples in the bench).
            self._writer.write(b"".join((*stuffed_blocks(payload), b".\r\n")))
            await self._drain("dot", timeout)
            return
        for block in stuffed_blocks(payload):
            self._writer.write(block)
            await self._drain("data", timeout)
        if before_dot is not None:
            try:
                await before_dot
            except Exception as exc:  # never the dot without what had to come first
                raise SMTPError("data", f"not sent: {exc}") from None
        self._check_quiet()
        self._writer.write(b".\r\n")
        await self._drain("dot", timeout)

    def _check_quiet(self) -> None:
        """Before the final dot: a reply already there answers something else (a server
        replying early), and would be read as the final reply (a delivery) if the dot went."""
        if pending_bytes(self._reader):
            raise SMTPError("data", "server replied before the end of data")

    async def rset(self) -> Reply:
        """Abort any transaction so the connection can be reused; unusable if refused."""
        reply = await self._command("mail", b"RSET\r\n")
        if not reply.is_ok:
            self._usable = False
        return reply

    async def _quiet_rset(self) -> Reply | None:
        """``rset``; None when it failed (the connection is then unusable)."""
        try:
            return await self.rset()
        except SMTPError:
            self._usable = False
            return None

    async def quit(self) -> None:
        """Say QUIT politely, ignoring any error, then close."""
        if not self._writer.is_closing():
            with contextlib.suppress(SMTPError, OSError):
                await self._command("quit", b"QUIT\r\n")
        self._usable = False
        self._stop_clock()
        self._writer.close()
        try:
            async with asyncio.timeout(min(self._timeouts.command, 10.0)):
                await self._writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError):
            self._writer.transport.abort()

    def close(self) -> None:
        """Drop the connection without QUIT."""
        self._usable = False
        self._stop_clock()
        self._writer.transport.abort()

    async def _command(self, stage: str, line: bytes) -> Reply:
        if pending_bytes(self._reader):
            # a reply before its command: every later one would be read as the answer to the
            # command before (a second greeting line made a RCPT's 550 the DATA's, and the
            # accepted recipients bounced with it)
            self._usable = False
            raise SMTPError(stage, "reply received before the command was sent")
        self._writer.write(line)
        await self._drain(stage, self._timeouts.command)
        return await self._read_reply(stage, self._timeouts.command)

    async def _drain(self, stage: str, timeout: float) -> None:
        transport = self._writer.transport
        if not transport.get_write_buffer_size() and not transport.is_closing():
            # All written: drain() would return at once (it waits for a paused transport, and
            # on a closing one yields for connection_lost() to raise), after two coroutines.
            return
        try:
            if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[0]:
                # At or below the low-water mark writing is not paused, so drain() cannot
                # block: skip arming a timer on the hot path.
                await self._writer.drain()
                return
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            self._usable = False
            raise SMTPError(stage, "timed out writing to server") from None
        except OSError as e:
            self._usable = False
            raise SMTPError(stage, f"connection lost: {e}") from e

    async def _read_reply(self, stage: str, timeout: float) -> Reply:
        self._start_clock(timeout)
        try:
            reply = await self._read_lines(stage)
        except (SMTPError, OSError) as e:
            self._usable = False
            if self._expired:  # the clock ran out and cut the connection
                raise SMTPError(stage, "timed out waiting for reply") from None
            if isinstance(e, SMTPError):
                raise
            raise SMTPError(stage, f"connection lost: {e}") from e
        finally:
            self._deadline = None
        if reply.code == 421 or (reply.code < 400 and not reply.is_ok and stage != "data"):
            # a 3xx where none is due (a 354 to RCPT or to the dot): the server is out of step
            # with us, and what it takes the next command for is unknown
            self._usable = False
        return reply

    # The reply clock: one timer per connection instead of an ``asyncio.timeout`` (a Timeout
    # object, a timer armed and cancelled, the task's cancel state) per reply. Each reply
    # still has its own deadline (RFC 5321 4.5.3.2); moving it later is an assignment, and
    # the timer, when it fires before the deadline, sets itself again for it.

    def _start_clock(self, timeout: float) -> None:
        loop = self._loop
        if loop is None:  # (asyncio.get_running_loop() costs a getpid() system call)
            loop = self._loop = asyncio.get_running_loop()
        self._deadline = deadline = loop.time() + timeout
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._clock_fired)

    def _clock_fired(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:  # no reply awaited now: the next one sets the clock again
            return
        loop = self._loop
        assert loop is not None
        if deadline - loop.time() > 0.001:
            self._timer = loop.call_at(deadline, self._clock_fired)
            return
        self._expired = True  # the reader wakes on the closed stream and raises the timeout
        self._usable = False
        self._writer.transport.abort()

    def _stop_clock(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _read_lines(self, stage: str) -> Reply:
        """One reply, read to its last line. Past ``MAX_REPLY_LINES`` lines or
        ``MAX_REPLY_BYTES`` bytes, and past ``_LONG_LINE_KEPT`` bytes of a line longer than the
        stream limit, the rest is read and dropped (its codes still checked): memory stays
        bounded, and the reply is still read (a 250 to the dot refused as "too long" was a
        deferral, and the message was sent again at every retry). The reply's deadline ends
        one that never ends."""
        lines: list[bytes] = []
        total = 0
        while True:
            line = await self._read_line(stage)
            last = len(line) < 5 or line[3:4] != b"-"
            if not lines:
                if last:  # most replies: one line
                    return _parse_line(line, stage)
            elif len(lines) >= MAX_REPLY_LINES or total > MAX_REPLY_BYTES:
                _check_line(line.rstrip(b"\r\n"), stage)  # beyond the caps: checked, dropped
                if line[:3] != lines[0][:3]:
                    raise SMTPError(stage, f"reply lines with different codes {line[:80]!r}")
                if last:
                    return _parse_reply(lines, stage)
                continue
            lines.append(line)
            total += len(line)
            if last:
                return _parse_reply(lines, stage)

    async def _read_line(self, stage: str) -> bytes:
        """One reply line with its line end; of a line longer than the stream limit, its
        first ``_LONG_LINE_KEPT`` bytes (the rest is read and dropped)."""
        reader = self._reader
        try:
            return await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            raise SMTPError(stage, "connection closed by server") from None
        except asyncio.LimitOverrunError as e:
            head = await self._read_exactly(stage, e.consumed)
        while True:  # drop the rest of the line, a stream limit's worth at a time
            try:
                await reader.readuntil(b"\n")
                return head[:_LONG_LINE_KEPT] + b"\r\n"
            except asyncio.IncompleteReadError:
                raise SMTPError(stage, "connection closed by server") from None
            except asyncio.LimitOverrunError as e:
                await self._read_exactly(stage, e.consumed)

    async def _read_exactly(self, stage: str, n: int) -> bytes:
        try:
            return await self._reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise SMTPError(stage, "connection closed by server") from None


def _in_step(stage: str, reply: Reply) -> None:
    """Raise on a 3xx to MAIL or RCPT sent alone: the server has gone into its data phase,
    where every later command is message text and its reply never comes (the next command
    waited out its timeout, the connection's slot held). The session ends there."""
    if 300 <= reply.code < 400:
        raise SMTPError(stage, f"unexpected reply to {stage.upper()}: {reply}")


def _settled(fut: Awaitable[object] | None) -> bool:
    """Whether there is nothing to wait for: None, or a future done with a result (one that
    failed takes the slow path, which raises before the dot)."""
    return fut is None or (isinstance(fut, asyncio.Future) and fut.done()
                           and not fut.cancelled() and fut.exception() is None)


def unverified_context() -> ssl.SSLContext:
    """Encryption without certificate checks (opportunistic TLS, and DANE, which checks the
    certificate itself against the TLSA records)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def verifying_context(ca_file: str | None = None) -> ssl.SSLContext:
    """PKIX: a certificate chain to a trusted CA (``ca_file``, else the system's) and the
    server name."""
    return ssl.create_default_context(cafile=ca_file)


# OpenSSL's X509_V_ERR_* codes, mapped to RFC 8460 result types.
_EXPIRED = 10
_NAME_MISMATCH = (62, 63, 64)  # host name, e-mail, IP address


def _tls_failure(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        if error.verify_code == _EXPIRED:
            return "certificate-expired"
        if error.verify_code in _NAME_MISMATCH:
            return "certificate-host-mismatch"
        return "certificate-not-trusted"
    return "validation-failure"


def _ascii_param(param: str) -> str:
    """A RCPT parameter for a transaction without SMTPUTF8, where xtext is ASCII (RFC 3461 4):
    an ORCPT a client gave in UTF-8 (RFC 6533 allows it in an SMTPUTF8 transaction) as
    ``utf-8;`` utf-8-addr-xtext (``\\x{E4}``) or, another type, xtext with each UTF-8 octet
    as ``+XX`` (as Postfix sends it). Sent as it was, 8-bit in the command, a server checking
    xtext refused the recipient (Postfix: 501 5.5.4 Bad ORCPT parameter syntax)."""
    key, eq, value = param.partition("=")
    if value.isascii():
        return param
    kind, sep, address = value.partition(";")
    if sep and kind.strip().lower() == "utf-8":
        return f"{key}={kind}{sep}" + "".join(
            c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in address)
    return f"{key}{eq}" + "".join(c if c.isascii() else "".join(
        f"+{b:02X}" for b in c.encode("utf-8", "surrogateescape")) for c in value)


def _ascii_address(address: str) -> str | None:
    """``local@U-label`` -> ``local@A-label``; None when the local part is not ASCII."""
    local, at, domain = address.rpartition("@")
    if not local.isascii():
        return None
    try:
        return f"{local}{at}{alabel_domain(domain)}"
    except PathError:
        return None
