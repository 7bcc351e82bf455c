"""A recording SMTP sink on loopback: stands in for the recipients' providers in tests, the demo
and the benchmark. It records each arrival (time, source IP, EHLO name, envelope) and the number
of concurrent connections per source IP, and answers per recipient as scripted."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from ..edge.smtp import BulkDataSMTP

_DSN_MAIL = re.compile(r"\s(?:ENVID|RET)=\S*", re.IGNORECASE)
_DSN_RCPT = re.compile(r"\s(?:NOTIFY|ORCPT)=\S*", re.IGNORECASE)
_NOTIFY = re.compile(r"\sNOTIFY=(\S*)", re.IGNORECASE)
_ORCPT = re.compile(r"\sORCPT=(\S*)", re.IGNORECASE)


@dataclass(slots=True)
class Arrival:
    time: float
    peer: str
    ehlo: str
    mail_from: str
    rcpts: list[str]
    data: bytes
    tls: str | None = None
    tag: str = ""
    smtputf8: bool = False
    """The transaction was sent with the SMTPUTF8 parameter."""
    notify: dict[str, str] = field(default_factory=dict)
    """Each recipient's NOTIFY parameter, as given (a sink offering DSN)."""
    orcpt: dict[str, str] = field(default_factory=dict)
    """Each recipient's ORCPT parameter, as given (a sink offering DSN)."""


class _SinkSMTP(BulkDataSMTP):
    def __init__(self, sink: Sink, **kwargs) -> None:
        super().__init__(sink, **kwargs)
        self.sink = sink
        self._peer_ip = ""
        self.notify = ""
        """The NOTIFY of the RCPT being answered (a sink offering DSN)."""
        self.orcpt = ""
        """Its ORCPT."""

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        await super().smtp_MAIL(_DSN_MAIL.sub("", arg or "") if self.sink.dsn else arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        self.notify = self.orcpt = ""
        if self.sink.dsn and arg:
            found = _NOTIFY.search(arg)
            self.notify = found.group(1) if found else ""
            found = _ORCPT.search(arg)
            self.orcpt = found.group(1) if found else ""
            if not self.orcpt.isascii() and not (self.envelope and self.envelope.smtp_utf8):
                # xtext is ASCII (RFC 3461 4); UTF-8 only in an SMTPUTF8 transaction (RFC
                # 6533), as Postfix answers
                await self.push("501 5.5.4 Bad ORCPT parameter syntax")
                return
            arg = _DSN_RCPT.sub("", arg)
        await super().smtp_RCPT(arg)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._peer_ip = peer[0] if peer else ""
        self.sink._connected(self._peer_ip)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink._disconnected(self._peer_ip)
        super().connection_lost(exc)


@dataclass
class Sink:
    host: str = "127.0.0.1"
    port: int = 0
    delay: float = 0.0
    """Seconds each message takes before its 250 (models a slow remote server)."""
    keep_data: bool = True
    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)
    """address -> replies to RCPT, used in order; the last one repeats (e.g. 450 then 250)."""
    data_reply: str = "250 2.0.0 Ok"
    tls_context: object | None = None
    smtputf8: bool = True
    """Offer SMTPUTF8 (RFC 6531); False: a server that only takes ASCII envelopes."""
    eightbitmime: bool = True
    """Offer 8BITMIME (RFC 6152); False: a server that takes 7-bit mail only."""
    pipelining: bool = True
    """Advertise PIPELINING (RFC 2920); False: a server whose clients wait for every reply."""
    dsn: bool = False
    """Advertise DSN (RFC 3461): the client then passes NOTIFY, ORCPT, ENVID and RET on."""
    tag_header: bytes = b""
    """If set (e.g. b"X-Bench-Id"), each arrival's ``tag`` is that header's value."""
    arrivals: list[Arrival] = field(default_factory=list)
    concurrent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    max_concurrent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    connections: int = 0
    rcpt_attempts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def __post_init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._event = asyncio.Event()

    async def start(self) -> Sink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _SinkSMTP(self, data_size_limit=None, enable_SMTPUTF8=self.smtputf8,
                              hostname="sink.test", tls_context=self.tls_context, loop=loop),
            self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _connected(self, ip: str) -> None:
        self.connections += 1
        self.concurrent[ip] += 1
        if self.concurrent[ip] > self.max_concurrent[ip]:
            self.max_concurrent[ip] = self.concurrent[ip]

    def _disconnected(self, ip: str) -> None:
        self.concurrent[ip] -= 1

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        """Advertise PIPELINING like the big providers do (aiosmtpd handles it, but is silent)."""
        session.host_name = hostname
        extra = ["250-PIPELINING"] if self.pipelining else []
        if self.dsn:
            extra.append("250-DSN")
        if not self.eightbitmime:
            responses = [r for r in responses if r[4:].upper() != "8BITMIME"]
        return responses[:-1] + [*extra, "250-ENHANCEDSTATUSCODES"] + responses[-1:]

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        self.rcpt_attempts[address] += 1
        script = self.rcpt_replies.get(address)
        reply = "250 2.1.5 Ok"
        if script:
            reply = script.pop(0) if len(script) > 1 else script[0]
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            notify = getattr(server, "notify", "")
            if notify:  # kept on the envelope until DATA makes the arrival
                given = getattr(envelope, "notify", {})
                envelope.notify = {**given, address: notify}  # type: ignore[attr-defined]
            orcpt = getattr(server, "orcpt", "")
            if orcpt:
                given = getattr(envelope, "orcpt", {})
                envelope.orcpt = {**given, address: orcpt}  # type: ignore[attr-defined]
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        tls = None
        if server.transport is not None:
            ssl_obj = server.transport.get_extra_info("ssl_object")
            tls = ssl_obj.version() if ssl_obj is not None else None
        data = envelope.original_content or b""
        tag = ""
        if self.tag_header:
            start = data.find(self.tag_header + b": ")
            if start >= 0:
                start += len(self.tag_header) + 2
                tag = data[start:data.find(b"\r\n", start)].decode()
        self.arrivals.append(Arrival(
            time=time.time(), peer=session.peer[0] if session.peer else "",
            ehlo=session.host_name or "", mail_from=envelope.mail_from or "",
            rcpts=list(envelope.rcpt_tos), data=data if self.keep_data else b"", tls=tls,
            tag=tag, smtputf8=bool(envelope.smtp_utf8), notify=getattr(envelope, "notify", {}),
            orcpt=getattr(envelope, "orcpt", {})))
        self._event.set()
        return self.data_reply

    async def wait_for(self, count: int, timeout: float = 30.0) -> list[Arrival]:
        """Wait until ``count`` messages arrived (raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        while len(self.arrivals) < count:
            self._event.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(self.arrivals)} of {count} messages arrived")
            try:
                await asyncio.wait_for(self._event.wait(), left)
            except TimeoutError:
                continue
        return self.arrivals

    def for_rcpt(self, address: str) -> list[Arrival]:
        return [a for a in self.arrivals if address in a.rcpts]


def _subject(data: bytes) -> str:
    head = data.split(b"\r\n\r\n", 1)[0]
    for line in head.split(b"\r\n"):
        if line[:8].lower() == b"subject:":
            return line[8:].strip().decode("utf-8", "replace")
    return ""


async def run_sink(host: str, port: int, delay: float, out: Callable[[str], None]) -> None:
    """A sink that runs until cancelled and tells ``out`` one line per message that arrives
    (``postlane sink``: the recipients' servers in the README's tour)."""
    sink = await Sink(host=host, port=port, delay=delay).start()
    out(f"sink listening on {host}:{sink.port}")
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await sink.wait_for(1, timeout=3600)
            for arrival in sink.arrivals:
                out(f"{time.strftime('%H:%M:%S', time.localtime(arrival.time))} from"
                    f" {arrival.peer} ({arrival.ehlo}) <{arrival.mail_from}> to"
                    f" {', '.join(arrival.rcpts)}: {_subject(arrival.data)}")
            sink.arrivals.clear()
    finally:
        await sink.stop()
