"""A scripted misbehaving SMTP server on loopback for the relay's fault tests.

Each connection takes the next fault from ``faults``; once they are used up the server behaves
(a plain, non-pipelining ESMTP server) and records what it accepted, so a test can see that a
message hit by a fault is retried and arrives."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

FAULTS = ("banner-timeout", "banner-554", "banner-421", "garbage-banner", "huge-reply",
          "huge-line", "ehlo-timeout", "ehlo-drop",
          "tls-fail", "mail-timeout", "mail-garbage", "mail-421", "mail-drop", "rcpt-timeout",
          "data-timeout", "drop-mid-data", "dot-timeout")


@dataclass
class BadServer:
    faults: list[str] = field(default_factory=list)
    port: int = 0
    host: str = "127.0.0.1"
    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    connections: int = 0

    async def start(self) -> BadServer:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  limit=2**20)
        self.port = self._server.sockets[0].getsockname()[1]
        self._arrived = asyncio.Event()
        return self

    async def stop(self) -> None:
        self._server.close()

    async def wait_for(self, count: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                self._arrived.clear()
                await self._arrived.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        fault = self.faults.pop(0) if self.faults else None
        try:
            await self._session(reader, writer, fault)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _hang(reader: asyncio.StreamReader) -> None:
        """Say nothing until the client gives up and closes."""
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    async def _session(self, reader, writer, fault: str | None) -> None:
        if fault == "banner-timeout":
            return await self._hang(reader)
        if fault == "banner-554":
            writer.write(b"554 5.3.2 No SMTP service here\r\n")
            return await self._hang(reader)
        if fault == "banner-421":
            writer.write(b"421 4.3.2 Too busy, try another\r\n")
            await writer.drain()
            return None
        if fault == "garbage-banner":
            writer.write(b"hello there, what is this?\r\n")
            return await self._hang(reader)
        if fault == "huge-reply":  # 10 MB of continuation lines
            line = b"220-" + b"x" * 996 + b"\r\n"
            for _ in range(10):
                writer.write(line * 1000)
                await writer.drain()
            writer.write(b"220 done\r\n")
            return await self._hang(reader)
        if fault == "huge-line":  # one 10 MB line without an end
            writer.write(b"220 ")
            for _ in range(10):
                writer.write(b"y" * 1_000_000)
                await writer.drain()
            return await self._hang(reader)
        writer.write(b"220 bad.test ESMTP\r\n")
        mail_from, rcpts = "", []
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                if fault == "ehlo-timeout":
                    return await self._hang(reader)
                if fault == "ehlo-drop":
                    writer.transport.abort()
                    return None
                tls = b"250-STARTTLS\r\n" if fault == "tls-fail" else b""
                writer.write(b"250-bad.test\r\n" + tls + b"250 8BITMIME\r\n")
            elif verb == b"STAR":
                writer.write(b"220 2.0.0 go ahead\r\n")
                writer.write(b"\x15\x03\x03\x00\x02\x02\x28not tls at all\r\n")
                await writer.drain()
                return
            elif verb == b"MAIL":
                if fault == "mail-timeout":
                    return await self._hang(reader)
                if fault == "mail-421":
                    writer.write(b"421 4.3.2 Shutting down\r\n")
                    await writer.drain()
                    return None
                if fault == "mail-drop":
                    writer.transport.abort()
                    return None
                if fault == "mail-garbage":
                    writer.write(b"OK?? \x00\xff\r\n")
                    continue
                mail_from, rcpts = line[10:].strip().decode().strip("<>"), []
                writer.write(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                if fault == "rcpt-timeout":
                    return await self._hang(reader)
                rcpts.append(line[8:].strip().decode().strip("<>"))
                writer.write(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                if fault == "data-timeout":
                    return await self._hang(reader)
                writer.write(b"354 go on\r\n")
                data = []
                while (chunk := await reader.readline()) != b".\r\n":
                    if not chunk:
                        return
                    data.append(chunk)
                    if fault == "drop-mid-data" and len(data) >= 2:
                        writer.transport.abort()
                        return
                if fault == "dot-timeout":
                    return await self._hang(reader)
                self.received.append((mail_from, rcpts, b"".join(data)))
                self._arrived.set()
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"RSET":
                writer.write(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"500 5.5.1 what?\r\n")
            await writer.drain()
