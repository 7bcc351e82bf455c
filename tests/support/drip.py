"""HTTPS servers that answer 200 and then send their body one byte at a time: a hostile or
broken host that never quite stops sending (an MTA-STS policy host, a TLS-RPT endpoint)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl


class Drip:
    """Reads the request's head, sends its headers, then one byte of the ``size``-byte body
    every ``interval`` s (bounded: it stops by itself)."""

    def __init__(self, context: ssl.SSLContext, size: int = 1500, interval: float = 0.05):
        self.context, self.size, self.interval = context, size, interval
        self.sent = 0
        self.port = 0

    async def _request(self, reader: asyncio.StreamReader) -> None:
        await reader.readuntil(b"\r\n\r\n")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            await self._request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\n\r\n" % self.size)
            for _ in range(self.size):
                writer.write(b"#")
                await writer.drain()
                self.sent += 1
                await asyncio.sleep(self.interval)
        writer.close()

    async def start(self, host: str) -> Drip:
        self.server = await asyncio.start_server(self._serve, host, 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.close()


class DripReply(Drip):
    """A report endpoint: takes the whole POST (counted in ``posts``), then drips its answer."""

    def __init__(self, context: ssl.SSLContext, size: int = 400, interval: float = 0.05):
        super().__init__(context, size, interval)
        self.posts = 0

    async def _request(self, reader: asyncio.StreamReader) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        match = re.search(rb"(?i)content-length: *(\d+)", head)
        await reader.readexactly(int(match.group(1)) if match else 0)
        self.posts += 1
