"""SMTPConnection against real servers on loopback: aiosmtpd as the well-behaved sink, small
hand-written asyncio servers for wire-level checks and misbehaviour."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import random
import socket
import ssl
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from postlane.relay.client import (
    Reply,
    SMTPConnection,
    SMTPError,
    Timeouts,
    prepare_data,
    stuffed_blocks,
)

HOST = "127.0.0.1"
FAST = Timeouts(connect=5, banner=5, command=5, data_block=5, dot=5)


# --- aiosmtpd sink -------------------------------------------------------------------------


@dataclass
class Received:
    peer: tuple[str, int]
    helo: str | None
    mail_from: str
    rcpts: list[str]
    mail_options: list[str]
    content: bytes


@dataclass
class SinkHandler:
    pipelining: bool = True
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    messages: list[Received] = field(default_factory=list)

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address, "250 2.1.5 Ok")
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        self.messages.append(
            Received(
                peer=session.peer,
                helo=session.host_name,
                mail_from=envelope.mail_from,
                rcpts=list(envelope.rcpt_tos),
                mail_options=list(envelope.mail_options),
                content=envelope.original_content,
            )
        )
        return "250 2.0.0 Ok: queued"


@dataclass
class Sink:
    handler: SinkHandler
    port: int


async def start_sink(handler: SinkHandler, **smtp_kw: Any) -> tuple[asyncio.Server, Sink]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.test", loop=loop, **smtp_kw), HOST, 0
    )
    return server, Sink(handler, server.sockets[0].getsockname()[1])


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    server, s = await start_sink(SinkHandler())
    yield s
    server.close()


@pytest.fixture
async def plain_sink() -> AsyncIterator[Sink]:
    """A sink that does not offer PIPELINING."""
    server, s = await start_sink(SinkHandler(pipelining=False))
    yield s
    server.close()


async def connect(port: int, **kw: Any) -> SMTPConnection:
    kw.setdefault("server_name", "sink.test")
    kw.setdefault("source_ip", None)
    kw.setdefault("ehlo_name", "relay.postlane.test")
    kw.setdefault("timeouts", FAST)
    return await SMTPConnection.open(HOST, port, **kw)


# --- hand-written servers ------------------------------------------------------------------

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(serve: Serve) -> AsyncIterator[int]:
    """Run ``serve`` per connection on an ephemeral port; on exit, stop its handlers too."""
    tasks: set[asyncio.Task[Any]] = set()

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client hung up, or the test is over
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class WireServer:
    """Answers MAIL/RCPT only once DATA has arrived, so a client that waits for each reply
    instead of pipelining deadlocks; records the raw DATA bytes as sent on the wire."""

    rcpt_reply: Callable[[int], bytes] = lambda i: b"250 2.1.5 Ok\r\n"
    drop_in_data: bool = False
    commands: list[bytes] = field(default_factory=list)
    wire_data: list[bytes] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a conversation is over (whoever ended it): what it saw is all it will see."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._converse(reader, writer)
        finally:
            self.ended.set()

    async def _converse(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 wire.test ESMTP\r\n")
        pending: list[bytes] = []
        rcpts = 0
        while line := await reader.readline():
            self.commands.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-wire.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n")
            elif verb == b"MAIL":
                pending.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                reply = self.rcpt_reply(rcpts)
                rcpts += 1
                pending.append(reply)
                if reply.startswith(b"421"):
                    writer.write(b"".join(pending))
                    await writer.drain()
                    return
            elif verb == b"DATA":
                writer.write(b"".join(pending) + b"354 End data with <CR><LF>.<CR><LF>\r\n")
                pending.clear()
                rcpts = 0
                if self.drop_in_data:
                    await reader.readline()
                    return
                self.wire_data.append(await reader.readuntil(b"\r\n.\r\n"))
                writer.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"".join(pending) + b"250 2.0.0 Ok\r\n")
                pending.clear()
            await writer.drain()


@pytest.fixture
async def wire() -> AsyncIterator[tuple[WireServer, int]]:
    ws = WireServer()
    async with raw_server(ws.serve) as port:
        yield ws, port


# --- TLS material --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("mx.test"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
async def tls_sink(cert_files: tuple[Path, Path]) -> AsyncIterator[Sink]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert_files)
    server, s = await start_sink(SinkHandler(), tls_context=ctx)
    yield s
    server.close()


# --- delivery ------------------------------------------------------------------------------

MESSAGE = (
    b"From: a@sender.test\r\n"
    b"To: x@rcpt.test\r\n"
    b"Subject: test\r\n"
    b"\r\n"
    b".leading dot must survive\r\n"
    b"..two dots too\r\n"
    b"caf\xc3\xa9 8-bit line\r\n"
    b".\r\n"
    b"last line\r\n"
)


async def test_pipelined_delivery_to_three_recipients(sink: Sink) -> None:
    conn = await connect(sink.port)
    assert "PIPELINING" in conn.extensions

    rcpts = ["x@rcpt.test", "y@rcpt.test", "z@rcpt.test"]
    tx = await conn.send("bounce@sender.test", [(r, "") for r in rcpts], MESSAGE)

    assert tx.mail_reply.is_ok
    assert [r.code for r in tx.rcpt_replies] == [250, 250, 250]
    assert tx.data_reply is not None and tx.data_reply.is_ok
    assert str(tx.data_reply) == "250 2.0.0 Ok: queued"
    assert tx.data_reply.enhanced == "2.0.0"
    assert conn.messages_sent == 1 and conn.usable
    [got] = sink.handler.messages
    assert got.mail_from == "bounce@sender.test"
    assert got.rcpts == rcpts
    assert got.content == MESSAGE
    assert "BODY=8BITMIME" in got.mail_options
    # RFC 1870 3: the message's octets, not its transparent dots
    assert f"SIZE={len(MESSAGE)}" in got.mail_options
    await conn.quit()
    assert not conn.usable


async def test_client_really_pipelines(wire: tuple[WireServer, int]) -> None:
    ws, port = wire
    conn = await connect(port)

    tx = await conn.send("s@a.test", [("x@b.test", ""), ("y@b.test", "")], b"hello\r\n")

    assert tx.data_reply is not None and tx.data_reply.is_ok
    assert [c.split(b":")[0] for c in ws.commands[1:5]] == [
        b"MAIL FROM",
        b"RCPT TO",
        b"RCPT TO",
        b"DATA\r\n",
    ]
    await conn.quit()


async def test_delivery_without_pipelining(plain_sink: Sink) -> None:
    conn = await connect(plain_sink.port)
    assert "PIPELINING" not in conn.extensions

    tx = await conn.send("s@a.test", [("x@b.test", ""), ("y@b.test", "")], MESSAGE)

    assert tx.data_reply is not None and tx.data_reply.is_ok
    assert plain_sink.handler.messages[0].content == MESSAGE
    await conn.quit()


async def test_source_ip_and_ehlo_name_reach_the_server(sink: Sink) -> None:
    conn = await connect(sink.port, source_ip="127.0.0.2", ehlo_name="out7.postlane.test")

    await conn.send("s@a.test", [("x@b.test", "")], b"Subject: hi\r\n\r\nbody\r\n")

    [got] = sink.handler.messages
    assert got.peer[0] == "127.0.0.2"
    assert got.helo == "out7.postlane.test"
    assert conn.peer_ip == HOST and conn.peer_port == sink.port
    assert conn.source_ip == "127.0.0.2"
    assert conn.banner.code == 220 and conn.ehlo_reply.is_ok
    await conn.quit()


@pytest.mark.parametrize("pipelining", [True, False])
async def test_per_recipient_replies(pipelining: bool) -> None:
    handler = SinkHandler(
        pipelining=pipelining,
        rcpt_replies={
            "later@b.test": "450 4.2.1 Mailbox busy",
            "nobody@b.test": "550 5.1.1 No such user",
        },
    )
    server, s = await start_sink(handler)
    try:
        conn = await connect(s.port)
        tx = await conn.send(
            "s@a.test", [("ok@b.test", ""), ("later@b.test", ""), ("nobody@b.test", "")], b"x\r\n"
        )
        assert [r.code for r in tx.rcpt_replies] == [250, 450, 550]
        ok, later, nobody = tx.rcpt_replies
        assert ok.is_ok and later.is_temp and nobody.is_perm
        assert later.enhanced == "4.2.1" and nobody.enhanced == "5.1.1"
        assert str(nobody) == "550 5.1.1 No such user"
        assert tx.data_reply is not None and tx.data_reply.is_ok
        assert handler.messages[0].rcpts == ["ok@b.test"]

        # Nobody accepted: no data, RSET, and the connection stays usable.
        tx = await conn.send("s@a.test", [("nobody@b.test", "")], b"x\r\n")
        assert tx.data_reply is None and [r.code for r in tx.rcpt_replies] == [550]
        assert conn.usable
        tx = await conn.send("s@a.test", [("ok@b.test", "")], b"again\r\n")
        assert tx.data_reply is not None and tx.data_reply.is_ok
        assert conn.messages_sent == 2 and len(handler.messages) == 2
        await conn.quit()
    finally:
        server.close()


async def test_dsn_parameters_dropped_when_not_offered(sink: Sink) -> None:
    conn = await connect(sink.port)
    assert "DSN" not in conn.extensions

    tx = await conn.send(
        "s@a.test",
        [("x@b.test", "NOTIFY=FAILURE ORCPT=rfc822;x@b.test")],
        b"x\r\n",
        mail_params="ENVID=abc RET=HDRS",
    )

    assert tx.mail_reply.is_ok and tx.rcpt_replies[0].is_ok, tx
    await conn.quit()


async def test_envelope_injection_is_refused(sink: Sink) -> None:
    conn = await connect(sink.port)
    with pytest.raises(ValueError):
        await conn.send("s@a.test", [("x@b.test>\r\nRCPT TO:<evil@c.test", "")], b"x\r\n")
    assert conn.usable
    await conn.quit()


async def test_bare_lf_is_normalised(wire: tuple[WireServer, int], sink: Sink) -> None:
    ws, port = wire
    conn = await connect(port)
    await conn.send("s@a.test", [("x@b.test", "")], b"a\n.\nb\r\n")
    await conn.quit()
    assert ws.wire_data == [b"a\r\n..\r\nb\r\n.\r\n"]

    conn = await connect(sink.port)
    await conn.send("s@a.test", [("x@b.test", "")], b"a\n.\nb\r\n")
    await conn.quit()
    [got] = sink.handler.messages
    assert got.content == b"a\r\n.\r\nb\r\n"


async def test_smuggling_attempt_stays_one_message(sink: Sink) -> None:
    smuggle = (
        b"Subject: hi\r\n\r\nbody\n.\r\n"
        b"MAIL FROM:<evil@a.test>\r\nRCPT TO:<victim@b.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nx\r\n.\r\n"
    )
    conn = await connect(sink.port)

    tx = await conn.send("s@a.test", [("x@b.test", "")], smuggle)
    await conn.quit()

    assert tx.data_reply is not None and tx.data_reply.is_ok
    [got] = sink.handler.messages
    assert got.rcpts == ["x@b.test"]
    assert b"MAIL FROM:<evil@a.test>" in got.content


@pytest.mark.parametrize(
    ("raw", "wire_form"),
    [
        (b"", b""),
        (b"no newline", b"no newline\r\n"),
        (b".x\r\n.\r\n", b"..x\r\n..\r\n"),
        (b"a\rb\r\n\r\n", b"a\r\nb\r\n\r\n"),
        (b"a\r\r\nb", b"a\r\n\r\nb\r\n"),
    ],
)
def test_prepare_data(raw: bytes, wire_form: bytes) -> None:
    assert prepare_data(raw) == wire_form


def _stuffed_whole(text: bytes) -> bytes:
    """The wire form made in one piece, as ``prepare_data`` made it before it went by blocks."""
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    if text.startswith(b"."):
        text = b"." + text
    return text.replace(b"\r\n.", b"\r\n..")


def test_stuffing_by_blocks_is_the_whole_message_stuffed() -> None:
    """Every cut between blocks (a block of 1 to 9 bytes) of messages made of dots, CRLFs and
    letters: a dot after a CRLF in the block before is stuffed, never one mid-line."""
    rng = random.Random(5321)
    for _ in range(400):
        lines = [rng.choice([b"", b".", b"..", b".x", b"x.", b"x", b"xy.z"])
                 for _ in range(rng.randint(0, 8))]
        text = b"\r\n".join(lines) + rng.choice([b"", b"\r\n"])
        for block in range(1, 10):
            assert b"".join(stuffed_blocks(text, block)) == _stuffed_whole(text), (text, block)


# --- TLS -----------------------------------------------------------------------------------


async def test_starttls_opportunistic(tls_sink: Sink) -> None:
    conn = await connect(tls_sink.port)

    assert conn.tls_version == "TLSv1.3"
    assert conn.tls_cipher
    assert "STARTTLS" not in conn.extensions  # EHLO was repeated after the handshake
    tx = await conn.send("s@a.test", [("x@b.test", "")], MESSAGE)
    assert tx.data_reply is not None and tx.data_reply.is_ok
    assert tls_sink.handler.messages[0].content == MESSAGE
    await conn.quit()


async def test_starttls_verified_with_trusted_cert(
    tls_sink: Sink, cert_files: tuple[Path, Path]
) -> None:
    ctx = ssl.create_default_context(cafile=str(cert_files[0]))
    conn = await connect(tls_sink.port, server_name="mx.test", tls="required", ssl_context=ctx)
    assert conn.tls_version is not None
    await conn.quit()


async def test_starttls_verification_failure(tls_sink: Sink) -> None:
    with pytest.raises(SMTPError) as info:
        await connect(tls_sink.port, server_name="mx.test", tls="required",
                      ssl_context=ssl.create_default_context())
    assert info.value.stage == "starttls" and info.value.temporary
    assert info.value.tls_failure == "certificate-not-trusted"


async def test_tls_required_but_not_offered(sink: Sink) -> None:
    with pytest.raises(SMTPError) as info:
        await connect(sink.port, tls="required")
    assert info.value.stage == "starttls" and info.value.temporary
    assert info.value.tls_failure == "starttls-not-supported"


async def test_tls_disabled_stays_plain(tls_sink: Sink) -> None:
    conn = await connect(tls_sink.port, tls="disabled")
    assert conn.tls_version is None and "STARTTLS" in conn.extensions
    await conn.quit()


# --- failures ------------------------------------------------------------------------------


async def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    with pytest.raises(SMTPError) as info:
        await connect(port)
    assert info.value.stage == "connect" and info.value.temporary


async def test_greeting_554_is_permanent() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"554 5.7.1 You are not welcome\r\n")
        if await reader.readline():
            writer.write(b"221 Bye\r\n")
            await writer.drain()

    async with raw_server(serve) as port:
        with pytest.raises(SMTPError) as info:
            await connect(port)
    err = info.value
    assert err.stage == "banner" and not err.temporary
    assert err.reply == Reply(554, "5.7.1 You are not welcome", "5.7.1")


async def test_greeting_421_is_temporary() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"421 4.3.2 Too busy\r\n")
        await writer.drain()

    async with raw_server(serve) as port:
        with pytest.raises(SMTPError) as info:
            await connect(port)
    assert info.value.stage == "banner" and info.value.temporary


async def test_garbage_reply() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        await reader.readline()
        writer.write(b"hello there, this is not SMTP\r\n")
        await writer.drain()
        await reader.read()

    async with raw_server(serve) as port:
        with pytest.raises(SMTPError) as info:
            await connect(port)
    assert info.value.stage == "ehlo" and info.value.temporary


async def test_plaintext_pipelined_after_starttls_reply_is_refused() -> None:
    """Bytes after the 220 to STARTTLS (a man in the middle injecting replies that would be
    read as if they came over TLS) end the session before the handshake."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        await reader.readline()
        writer.write(b"250-mx.test\r\n250 STARTTLS\r\n")
        await reader.readline()
        writer.write(b"220 2.0.0 go ahead\r\n250 injected\r\n")  # one segment
        await writer.drain()
        await reader.read()

    async with raw_server(serve) as port:
        with pytest.raises(SMTPError) as info:
            await connect(port, tls="required")
    err = info.value
    assert err.stage == "starttls" and err.tls_failure == "validation-failure"
    assert "pipelined" in str(err)


async def test_banner_timeout() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with raw_server(serve) as port:
        with pytest.raises(SMTPError) as info:
            await connect(port, timeouts=Timeouts(banner=0.2))
    assert info.value.stage == "banner" and info.value.temporary


async def test_connection_dropped_mid_data() -> None:
    ws = WireServer(drop_in_data=True)
    async with raw_server(ws.serve) as port:
        conn = await connect(port)
        body = b"Subject: big\r\n\r\n" + b"0123456789" * 100_000
        with pytest.raises(SMTPError) as info:
            await conn.send("s@a.test", [("x@b.test", "")], body)
    assert info.value.stage in ("data", "dot") and info.value.temporary
    assert not conn.usable


async def test_421_to_rcpt_makes_connection_unusable() -> None:
    ws = WireServer(
        rcpt_reply=lambda i: b"250 2.1.5 Ok\r\n" if i == 0 else b"421 4.4.2 Shutting down\r\n"
    )
    async with raw_server(ws.serve) as port:
        conn = await connect(port)
        tx = await conn.send(
            "s@a.test", [("x@b.test", ""), ("y@b.test", ""), ("z@b.test", "")], b"x\r\n"
        )
    assert [r.code for r in tx.rcpt_replies] == [250, 421, 421]
    assert tx.data_reply is not None and tx.data_reply.code == 421
    assert not conn.usable
    await conn.quit()


async def _serve_huge(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, chunk: bytes
) -> None:
    writer.write(head)
    for _ in range(10 * 1024 * 1024 // len(chunk)):
        writer.write(chunk)
        await writer.drain()


@pytest.mark.parametrize(
    ("head", "chunk"),
    [
        (b"220 ", b"x" * 65536),  # one 10 MB line
        (b"", b"220-" + b"y" * 60 + b"\r\n"),  # endless continuation lines
    ],
    ids=["long-line", "many-lines"],
)
async def test_huge_reply_is_refused_without_buffering(head: bytes, chunk: bytes) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_huge(reader, writer, head, chunk)

    async with raw_server(serve) as port:
        tracemalloc.start()
        try:
            with pytest.raises(SMTPError) as info:
                await connect(port)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert info.value.stage == "banner"
    assert peak < 4 * 1024 * 1024


async def test_server_that_stops_reading_data_times_out() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        while line := await reader.readline():
            if line.upper().startswith(b"EHLO"):
                writer.write(b"250 hi\r\n")
            elif line.upper().startswith(b"DATA"):
                writer.write(b"354 go\r\n")
                await writer.drain()
                await asyncio.Event().wait()  # never read the data
            else:
                writer.write(b"250 Ok\r\n")
            await writer.drain()

    async with raw_server(serve) as port:
        conn = await connect(port, timeouts=Timeouts(command=5, data_block=0.3, dot=5))
        with pytest.raises(SMTPError) as info:
            await conn.send("s@a.test", [("x@b.test", "")], (b"y" * 998 + b"\r\n") * 40_000)
    assert info.value.stage == "data" and info.value.temporary
    assert not conn.usable


# --- the end of data and the reply clock -----------------------------------------------------


async def test_message_and_final_dot_when_nothing_is_awaited_before_it(
        wire: tuple[WireServer, int]) -> None:
    """A settled ``before_dot`` (the SQLite spool's journal) lets the message and its end mark
    go in one write; the receiver reads one message, dot-stuffed, ended once."""
    ws, port = wire
    conn = await connect(port)
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    tx = await conn.send("s@a.test", [("x@b.test", "")], MESSAGE, before_dot=done)
    assert tx.data_reply is not None and tx.data_reply.code == 250
    assert ws.wire_data == [prepare_data(MESSAGE) + b".\r\n"]
    await conn.quit()


async def test_failed_before_dot_already_done_sends_no_dot(wire: tuple[WireServer, int]) -> None:
    ws, port = wire
    conn = await connect(port)
    failed = asyncio.get_running_loop().create_future()
    failed.set_exception(OSError("journal not written"))
    with pytest.raises(SMTPError) as info:
        await conn.send("s@a.test", [("x@b.test", "")], MESSAGE, before_dot=failed)
    assert info.value.stage == "data" and "journal not written" in info.value.message
    assert not conn.usable
    await asyncio.wait_for(ws.ended.wait(), 10)  # the client dropped the connection
    assert ws.wire_data == []  # the server never saw an end of data


async def test_pending_before_dot_is_awaited_before_the_dot(wire: tuple[WireServer, int]) -> None:
    ws, port = wire
    conn = await connect(port)
    loop = asyncio.get_running_loop()
    pending = loop.create_future()
    loop.call_later(0.05, pending.set_result, None)
    tx = await conn.send("s@a.test", [("x@b.test", "")], MESSAGE, before_dot=pending)
    assert tx.data_reply is not None and tx.data_reply.code == 250
    assert ws.wire_data == [prepare_data(MESSAGE) + b".\r\n"]
    await conn.quit()


def _slow_server(delay: float, answer_dot: bool = True) -> Serve:
    """Answers every command one by one, each after ``delay`` seconds (no PIPELINING)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slow.test\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            await asyncio.sleep(delay)  # the scenario: a server slow to answer, in real time
            if verb == b"DATA":
                writer.write(b"354 go\r\n")
                await writer.drain()
                await reader.readuntil(b"\r\n.\r\n")
                if not answer_dot:
                    await asyncio.Event().wait()
                await asyncio.sleep(delay)  # slow to answer the dot too
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 Bye\r\n")
                await writer.drain()
                return
            elif verb == b"EHLO":
                writer.write(b"250-slow.test\r\n250 8BITMIME\r\n")  # MESSAGE is 8-bit
            else:
                writer.write(b"250 Ok\r\n")
            await writer.drain()

    return serve


async def test_each_reply_has_its_own_deadline() -> None:
    """The clock is per reply (RFC 5321 4.5.3.2), not per transaction: five replies that each
    take 0.3 s pass a 1 s command timeout although the whole takes longer."""
    async with raw_server(_slow_server(0.3)) as port:
        conn = await connect(port, timeouts=Timeouts(connect=5, banner=5, command=1,
                                                     data_block=5, dot=1))
        tx = await conn.send("s@a.test", [("x@b.test", ""), ("y@b.test", "")], MESSAGE)
        assert tx.data_reply is not None and tx.data_reply.code == 250
        assert conn.usable
        await conn.quit()


async def test_final_reply_that_never_comes_times_out() -> None:
    async with raw_server(_slow_server(0, answer_dot=False)) as port:
        conn = await connect(port, timeouts=Timeouts(connect=5, banner=5, command=5,
                                                     data_block=5, dot=0.3))
        with pytest.raises(SMTPError) as info:
            await conn.send("s@a.test", [("x@b.test", "")], MESSAGE)
    assert info.value.stage == "dot" and info.value.message == "timed out waiting for reply"
    assert info.value.temporary and not conn.usable


# --- hostile receivers: replies that must never read as a delivery --------------------------


@dataclass
class Scripted:
    """Answers each command as it reads it, with ``replies`` by verb (default 250); DATA's 354
    is followed by reading the data and ``dot``. Records what it received."""

    ehlo: bytes = b"250-scripted.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
    replies: dict[bytes, bytes] = field(default_factory=dict)
    dot: bytes = b"250 2.0.0 Ok\r\n"
    commands: list[bytes] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted.test\r\n")
        while line := await reader.readline():
            self.commands.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(self.ehlo)
            elif verb == b"QUIT":
                writer.write(b"221 Bye\r\n")
                await writer.drain()
                return
            else:
                reply = self.replies.get(verb, b"354 go\r\n" if verb == b"DATA" else b"250 Ok\r\n")
                writer.write(reply)
                if verb == b"DATA" and reply.startswith(b"354"):
                    await writer.drain()
                    self.data.append(await reader.readuntil(b"\r\n.\r\n"))
                    writer.write(self.dot)
            await writer.drain()


async def test_data_command_answered_250_is_not_a_delivery() -> None:
    """A 250 where DATA wants 354 means the message was never sent: no outcome may read it
    as delivered (it was: data_reply carried the 250)."""
    server = Scripted(replies={b"DATA": b"250 2.0.0 Ok\r\n"})
    async with raw_server(server.serve) as port:
        conn = await connect(port)
        with pytest.raises(SMTPError) as info:
            await conn.send("s@a.test", [("x@b.test", "")], MESSAGE)
    assert info.value.stage == "data" and info.value.temporary
    assert server.data == [] and not conn.usable


async def test_final_reply_with_mixed_codes_is_malformed() -> None:
    """``250-queued`` then ``550 rejected``: RFC 5321 4.2.1 wants one code per reply; taking
    the first line's made a rejected message delivered."""
    server = Scripted(dot=b"250-2.0.0 queued\r\n550 5.7.1 rejected after all\r\n")
    async with raw_server(server.serve) as port:
        conn = await connect(port)
        with pytest.raises(SMTPError) as info:
            await conn.send("s@a.test", [("x@b.test", "")], MESSAGE)
    assert info.value.stage == "dot" and "different codes" in info.value.message
    assert not conn.usable


@pytest.mark.parametrize(
    ("ehlo", "body", "status"),
    [
        (b"250-x\r\n250-PIPELINING\r\n250 SIZE 100\r\n", b"Subject: big\r\n\r\n" + b"y" * 200,
         "5.3.4"),
        (b"250-x\r\n250 PIPELINING\r\n", "Subject: x\r\n\r\nGrüße\r\n".encode(), "5.6.3"),
        (b"250-x\r\n250 PIPELINING\r\n", "Subject: Grüße\r\n\r\nx\r\n".encode(), "5.6.3"),
    ],
    ids=["over-size", "8bit-without-8bitmime", "utf8-headers-without-8bitmime"],
)
async def test_message_the_server_cannot_take_is_not_sent(
        ehlo: bytes, body: bytes, status: str) -> None:
    """What the EHLO says the server cannot take is refused here, before MAIL: sent, it was
    cut by the server's limit or delivered as bytes the server never agreed to carry."""
    server = Scripted(ehlo=ehlo)
    async with raw_server(server.serve) as port:
        conn = await connect(port)
        tx = await conn.send("s@a.test", [("x@b.test", ""), ("y@b.test", "")], body)
        assert tx.mail_reply.is_perm and tx.mail_reply.enhanced == status
        assert [r.enhanced for r in tx.rcpt_replies] == [status, status]
        assert tx.data_reply is None and conn.usable
        await conn.quit()
    assert [c[:4] for c in server.commands] == [b"EHLO", b"QUIT"]


async def test_stray_reply_after_a_transaction_ends_reuse() -> None:
    """A reply nobody asked for, after the final one, shifts every later reply by one: the
    next message's MAIL would be answered by it (here a 550 that would bounce it). Such a
    connection is not reused."""
    server = Scripted(dot=b"250 2.0.0 Ok\r\n550 5.7.1 stray\r\n")
    async with raw_server(server.serve) as port:
        conn = await connect(port)
        tx = await conn.send("s@a.test", [("x@b.test", "")], MESSAGE)
        assert tx.data_reply is not None and tx.data_reply.code == 250
        assert not conn.usable
        with pytest.raises(SMTPError):
            await conn.send("s@a.test", [("y@b.test", "")], MESSAGE)
        assert len(server.data) == 1
        await conn.quit()


@pytest.mark.parametrize("body", [MESSAGE, MESSAGE + b"z" * 400_000 + b"\r\n"],
                         ids=["one-block", "blocks"])
async def test_reply_before_the_end_of_data_is_not_the_final_reply(body: bytes) -> None:
    """A 250 sent with the 354, before any data, is no answer to the final dot (this server
    then never answers the dot): the message is not delivered."""
    server = Scripted(replies={b"DATA": b"354 go\r\n250 2.0.0 early\r\n"}, dot=b"")
    async with raw_server(server.serve) as port:
        conn = await connect(port)
        with pytest.raises(SMTPError) as info:
            await conn.send("s@a.test", [("x@b.test", "")], body)
    assert info.value.stage == "data" and info.value.temporary
    assert not conn.usable


async def test_3xx_to_the_final_dot_defers_and_ends_reuse() -> None:
    """A 354 to the dot: not delivered, and the server may still be reading data, where the
    next transaction's commands would land."""
    server = Scripted(dot=b"354 2.0.0 more please\r\n")
    async with raw_server(server.serve) as port:
        conn = await connect(port)
        tx = await conn.send("s@a.test", [("x@b.test", "")], MESSAGE)
        assert tx.data_reply is not None and tx.data_reply.code == 354
        assert not conn.usable and conn.messages_sent == 0
        await conn.quit()


@pytest.mark.parametrize(
    ("ehlo", "asked", "body", "sent", "status"),
    [
        (b"250-x\r\n250 8BITMIME\r\n", True, "Subject: Grüße\r\n\r\nx\r\n", None, "5.6.7"),
        (b"250-x\r\n250 8BITMIME\r\n", False, "Subject: Grüße\r\n\r\nx\r\n",
         b"MAIL FROM:<s@a.test> BODY=8BITMIME\r\n", None),
        (b"250-x\r\n250 8BITMIME\r\n", True, "Subject: x\r\n\r\nGrüße\r\n",
         b"MAIL FROM:<s@a.test> BODY=8BITMIME\r\n", None),
        (b"250-x\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n", True, "Subject: Grüße\r\n\r\nx\r\n",
         b"MAIL FROM:<s@a.test> BODY=8BITMIME SMTPUTF8\r\n", None),
        (b"250-x\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n", True, "Subject: x\r\n\r\nx\r\n",
         b"MAIL FROM:<s@a.test>\r\n", None),
    ],
    ids=["asked-utf8-header-no-smtputf8", "not-asked-utf8-header", "asked-8bit-body-only",
         "asked-server-offers-it", "asked-all-ascii"],
)
async def test_smtputf8_is_sent_when_needed_and_required_when_asked(
        ehlo: bytes, asked: bool, body: str, sent: bytes | None, status: str | None) -> None:
    """RFC 6531 3.2: a message that asked for SMTPUTF8 and has UTF-8 in its header is not sent
    to a server without it (550 5.6.7, Postfix's text); the parameter goes only when needed."""
    server = Scripted(ehlo=ehlo)
    async with raw_server(server.serve) as port:
        conn = await connect(port)
        tx = await conn.send("s@a.test", [("x@b.test", "")], body.encode(), smtputf8=asked)
        await conn.quit()
    if status is not None:
        assert tx.mail_reply.code == 550 and tx.mail_reply.enhanced == status
        assert "SMTPUTF8 is required, but was not offered by host" in tx.mail_reply.text
        assert [c[:4] for c in server.commands] == [b"EHLO", b"QUIT"]
    else:
        assert tx.data_reply is not None and tx.data_reply.is_ok
        assert server.commands[1] == sent


@pytest.mark.parametrize("refusal", [b"501 5.5.2 Syntax error\r\n",
                                     b"550 5.5.1 Command unknown\r\n",
                                     b"554 5.5.1 EHLO not supported\r\n",
                                     b"451 4.3.0 try HELO\r\n"])
async def test_ehlo_refused_falls_back_to_helo(refusal: bytes) -> None:
    """RFC 5321 4.1.4 lets a server refuse EHLO with 501, 500, 502 or 550; a client that can
    do without extensions says HELO then (Postfix does for any refusal but 421, smtplib for
    any). Only 500 and 502 were tried: after a 550 to EHLO the batch bounced, unsent."""
    server = Scripted(ehlo=refusal)
    async with raw_server(server.serve) as port:
        conn = await connect(port)
        assert conn.extensions == {}
        tx = await conn.send("s@a.test", [("x@b.test", "")], b"Subject: x\r\n\r\nascii\r\n")
        assert tx.data_reply is not None and tx.data_reply.code == 250
        await conn.quit()
    assert [c[:4] for c in server.commands[:3]] == [b"EHLO", b"HELO", b"MAIL"]


async def test_ehlo_answered_421_is_not_retried_with_helo() -> None:
    """421 says the server is closing: the session ends there."""
    server = Scripted(ehlo=b"421 4.3.2 shutting down\r\n")
    async with raw_server(server.serve) as port:
        with pytest.raises(SMTPError) as info:
            await connect(port)
    assert info.value.stage == "ehlo" and info.value.temporary
    assert [c[:4] for c in server.commands] == [b"EHLO"]


async def test_size_counts_the_message_not_its_transparent_dots() -> None:
    """RFC 1870: the size excludes the dots added by stuffing. A message of exactly the
    server's SIZE whose lines begin with "." was refused here (552 5.3.4, a bounce) for the
    octets of its wire form, and would have been declared larger than it is."""
    body = b"Subject: x\r\n\r\n.a\r\n.b\r\n.c\r\n"  # 26 octets, 29 on the wire
    server = Scripted(ehlo=b"250-x\r\n250-PIPELINING\r\n250 SIZE 26\r\n")
    async with raw_server(server.serve) as port:
        conn = await connect(port)
        tx = await conn.send("s@a.test", [("x@b.test", "")], body)
        assert tx.data_reply is not None and tx.data_reply.code == 250
        await conn.quit()
    assert server.commands[1] == b"MAIL FROM:<s@a.test> SIZE=26\r\n"
    assert server.data == [b"Subject: x\r\n\r\n..a\r\n..b\r\n..c\r\n.\r\n"]


async def test_a_size_that_is_not_ascii_digits_is_no_limit() -> None:
    """``250 SIZE ²``: ``isdigit`` holds and ``int`` raised inside ``send`` (not an
    SMTPError: every batch to the server ended as an internal error)."""
    server = Scripted(ehlo="250-x\r\n250-PIPELINING\r\n250 SIZE ²\r\n".encode())
    async with raw_server(server.serve) as port:
        conn = await connect(port)
        tx = await conn.send("s@a.test", [("x@b.test", "")], b"Subject: x\r\n\r\nascii\r\n")
        assert tx.data_reply is not None and tx.data_reply.code == 250
        await conn.quit()
    assert server.commands[1] == b"MAIL FROM:<s@a.test> SIZE=21\r\n"


async def test_an_enhanced_code_is_ascii_digits() -> None:
    """``\\d`` in a str pattern matches any Unicode digit: a reply ``550 5.٧.١ no`` gave the
    status ``5.٧.١``, which went on into the DSN's Status field and the records. Without a
    valid code the status comes from the reply's class (5.0.0)."""
    server = Scripted(dot="550 5.٧.١ no\r\n".encode())
    async with raw_server(server.serve) as port:
        conn = await connect(port)
        tx = await conn.send("s@a.test", [("x@b.test", "")], b"Subject: x\r\n\r\nascii\r\n")
        await conn.quit()
    assert tx.data_reply is not None and tx.data_reply.code == 550
    assert tx.data_reply.enhanced is None


@pytest.mark.parametrize("pipelining", [True, False])
async def test_refusals_read_before_a_close_stand(pipelining: bool) -> None:
    """550 to the first RCPT, 250 to the second, then the server hangs up before answering
    DATA: the 550 is the first recipient's answer (it bounces), the second's is the loss
    (451 4.4.2, deferred); no SMTPError, the connection closed."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        answers = [b"250 2.1.0 Ok\r\n", b"550 5.1.1 no such user\r\n", b"250 2.1.5 Ok\r\n"]
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-hi\r\n250-PIPELINING\r\n250 8BITMIME\r\n" if pipelining
                             else b"250-hi\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                return
            else:
                writer.write(answers.pop(0))
            await writer.drain()

    async with raw_server(serve) as port:
        conn = await connect(port)
        tx = await conn.send("s@a.test", [("x@b.test", ""), ("y@b.test", "")], MESSAGE)
    assert [str(r) for r in tx.rcpt_replies] == ["550 5.1.1 no such user", "250 2.1.5 Ok"]
    assert str(tx.data_reply) == "451 4.4.2 data: connection closed by server"
    assert not conn.usable


async def test_refusals_stand_when_an_empty_data_goes_unanswered() -> None:
    """Every RCPT refused, and yet 354 to DATA: the client ends the data empty; the server
    hangs up instead of answering. The refusals are still the answers (they were lost: the
    error at the dot deferred the 550 recipient)."""
    server = Scripted(replies={b"RCPT": b"550 5.1.1 no such user\r\n"}, dot=b"")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        while line := await reader.readline():
            server.commands.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-hi\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"RCPT":
                writer.write(b"550 5.1.1 no such user\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go on\r\n")
            elif line == b".\r\n":
                return
            else:
                writer.write(b"250 Ok\r\n")
            await writer.drain()

    async with raw_server(serve) as port:
        conn = await connect(port)
        tx = await conn.send("s@a.test", [("x@b.test", "")], MESSAGE)
    assert [str(r) for r in tx.rcpt_replies] == ["550 5.1.1 no such user"]
    assert tx.data_reply is None and not conn.usable


@pytest.mark.parametrize(
    "chunk",
    [b"x" * 65536, b"220-" + b"y" * 60 + b"\r\n"],
    ids=["endless-line", "endless-continuation-lines"],
)
async def test_an_endless_reply_ends_at_its_deadline_in_bounded_memory(chunk: bytes) -> None:
    """A greeting that never ends (one line, or continuation lines, sent without pause and
    without closing): what is past the reply caps is read and dropped, so memory stays
    bounded, and the banner deadline ends it."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 " if chunk.startswith(b"x") else b"")
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(chunk)
                await writer.drain()

    async with raw_server(serve) as port:
        tracemalloc.start()
        try:
            with pytest.raises(SMTPError) as info:
                await connect(port, timeouts=Timeouts(connect=2, banner=2, command=2))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert info.value.stage == "banner" and "timed out" in info.value.message
    assert peak < 4 * 1024 * 1024


@pytest.mark.parametrize("verb", [b"MAIL", b"RCPT"])
async def test_a_354_to_mail_or_rcpt_without_pipelining_ends_the_session_at_once(
        verb: bytes) -> None:
    """Without PIPELINING a 354 to MAIL or RCPT puts the server in its data phase: every
    command sent after it is message text, so the next reply never comes (the client sent the
    next RCPT, then DATA or RSET, and waited out the command timeout, the connection's slot
    held). Now the session ends there: the recipients are deferred, nothing more is sent."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hi\r\n")
        while line := await reader.readline():
            seen.append(line)
            if line[:4].upper() == b"EHLO":
                writer.write(b"250-hi\r\n250 8BITMIME\r\n")
            elif line[:4].upper() == verb:
                writer.write(b"354 go on\r\n")
                await writer.drain()
                await reader.read()  # in its data phase until the client hangs up
                return
            else:
                writer.write(b"250 Ok\r\n")
            await writer.drain()

    slow = Timeouts(connect=5, banner=5, command=300, data_block=5, dot=300)
    async with raw_server(serve) as port, asyncio.timeout(60):  # a hang guard, not a clock
        conn = await connect(port, timeouts=slow)
        try:
            tx = await conn.send("s@a.test", [("x@b.test", ""), ("y@b.test", "")], MESSAGE)
        except SMTPError as exc:
            assert exc.temporary
        else:
            assert not any(r.is_ok for r in tx.rcpt_replies) and tx.data_reply is None
    assert not conn.usable
    assert seen[-1][:4].upper() == verb
