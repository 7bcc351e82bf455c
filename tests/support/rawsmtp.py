"""A byte-level SMTP client for hostile-input tests: it sends exactly the bytes it is given."""

from __future__ import annotations

import asyncio
import contextlib


class RawSMTP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, source: str | None = None) -> RawSMTP:
        """Connect to 127.0.0.1:port, from ``source`` (another loopback address) if given."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, limit=2**20, local_addr=(source, 0) if source else None)
        return cls(reader, writer)

    async def reply(self, timeout: float = 10.0) -> str:
        """One full (possibly multi-line) reply as text; "" when the server closed."""
        lines = []
        async with asyncio.timeout(timeout):
            while True:
                line = await self.reader.readline()
                if not line:
                    return "".join(lines)
                lines.append(line.decode("utf-8", "replace"))
                if len(line) < 4 or line[3:4] != b"-":
                    return "".join(lines)

    async def cmd(self, line: bytes | str) -> str:
        self.send(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        return await self.reply()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def closed(self, timeout: float = 10.0) -> bool:
        """Whether the server closes the connection (reads and drops anything left)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def session(port: int, ehlo: str = "client.test") -> RawSMTP:
    """Connected, greeted and EHLO'd."""
    raw = await RawSMTP.connect(port)
    assert (await raw.reply()).startswith("220")
    assert (await raw.cmd(f"EHLO {ehlo}")).startswith("250")
    return raw
