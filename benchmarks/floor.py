"""The least CPU per message a Python relay on uvloop can spend on the plain-client workload.

Issue 17 asks for a node at 40 % of `d9db5f8`'s CPU per message. This is the floor any Python
design on this event loop starts from: a store-and-forward relay with nothing but the SMTP
exchanges and the two durable writes every MTA makes (the message committed before its 250, its
delivery committed after the receiver's 250), written directly on ``asyncio.Protocol`` with no
library: no policy, no accounting or audit records, no monitoring, no DKIM, no TLS, no limits,
no retries, one queue in memory. Postlane does all of those on top, so its CPU per message cannot
go below this one's.

It runs as the node of ``postlane bench`` through ``--node-from``: make a directory whose
``.venv/bin/python`` runs this file with the bench's arguments::

    mkdir -p /tmp/floor/.venv/bin
    printf '#!/bin/sh\\nexec %s %s "$3"\\n' "$PWD/.venv/bin/python" "$PWD/benchmarks/floor.py" \\
        > /tmp/floor/.venv/bin/python && chmod +x /tmp/floor/.venv/bin/python
    .venv/bin/python benchmarks/abba.py --same-load --a /work/base-d9 --b . -- --marketing 20000 \\
        --no-pipelining --reconnect-every 100 --domains 1 --message-kb 2.5 --connections 8 \\
        --sink-no-pipelining --node-from /tmp/floor      # the B side's node is this floor

(the bench's end-of-run ``/metrics`` read fails: there is no API, and it says so in the JSON).
In the wrapper's environment, ``FLOOR_EDGE=aiosmtpd`` (the intake on stock aiosmtpd),
``FLOOR_EDGE=bulk`` (on aiosmtpd as Postlane's edge subclasses it: DATA read in blocks, strict
paths, held replies) and ``FLOOR_RELAY=streams`` (the outbound side on asyncio streams) measure
what each library adds to the floor.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sqlite3
import sys
import threading
from collections.abc import Callable
from pathlib import Path

OUTBOUND = 8  # connections to the receiver, as the bench's marketing pool allows


class Store:
    """Group commit in one thread: every write waiting when a commit starts goes in it; the
    callers' futures resolve after the fsync (WAL, synchronous=FULL)."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS q (id INTEGER PRIMARY KEY, data BLOB)")
        self.pending: list[tuple[str, tuple, Callable[[int], None]]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def write(self, sql: str, args: tuple, done: Callable[[int], None]) -> None:
        with self.cond:
            self.pending.append((sql, args, done))
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending:
                    self.cond.wait()
                batch, self.pending = self.pending, []
            self.db.execute("BEGIN")
            ids = [self.db.execute(sql, args).lastrowid or 0 for sql, args, _ in batch]
            self.db.execute("COMMIT")
            self.loop.call_soon_threadsafe(_resolve, [(d, i) for (_, _, d), i in
                                                      zip(batch, ids, strict=True)])


def _resolve(done: list[tuple[Callable[[int], None], int]]) -> None:
    for callback, value in done:
        callback(value)


class Intake(asyncio.Protocol):
    """SMTP server side: one reply per command, the 250 after DATA once the message is
    committed."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.buf = b""
        self.data: bytes | None = None
        self.sender = b""
        self.rcpt = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.t.write(b"220 floor ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.data is not None:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    return
                message, self.buf = self.buf[:end + 2], self.buf[end + 5:]
                self.data = None
                self.node.accept(self.sender, self.rcpt, message, self.t)
                continue
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            line, self.buf = self.buf[:end], self.buf[end + 2:]
            verb = line[:4].upper()
            if verb == b"EHLO" or verb == b"HELO":
                self.t.write(b"250-floor\r\n250-SIZE 52428800\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                self.sender = line[10:].strip()
                self.t.write(b"250 2.1.0 OK\r\n")
            elif verb == b"RCPT":
                self.rcpt = line[8:].strip()
                self.t.write(b"250 2.1.5 OK\r\n")
            elif verb == b"DATA":
                self.data = b""
                self.t.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                self.t.write(b"221 2.0.0 Bye\r\n")
                self.t.close()
            else:
                self.t.write(b"250 2.0.0 OK\r\n")


class Outbound(asyncio.Protocol):
    """SMTP client side to a receiver without PIPELINING: each command waits for its reply."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.buf = b""
        self.step = 0  # 0 greeting, 1 EHLO, then 2 MAIL, 3 RCPT, 4 DATA, 5 the dot
        self.job: tuple[int, bytes, bytes, bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            line, self.buf = self.buf[:end], self.buf[end + 2:]
            if line[3:4] == b"-":
                continue  # a multi-line reply goes on
            self.reply()

    def reply(self) -> None:
        if self.step == 0:
            self.t.write(b"EHLO floor\r\n")  # type: ignore[attr-defined]
            self.step = 1
        elif self.step in (1, 5):
            if self.step == 5:
                self.node.delivered(self.job[0])  # type: ignore[index]
            self.job = None
            self.step = 2
            self.node.idle(self)
        elif self.step == 2:
            self.t.write(b"RCPT TO:" + self.job[2] + b"\r\n")  # type: ignore[index, attr-defined]
            self.step = 3
        elif self.step == 3:
            self.t.write(b"DATA\r\n")  # type: ignore[attr-defined]
            self.step = 4
        elif self.step == 4:
            self.t.write(self.job[3] + b".\r\n")  # type: ignore[index, attr-defined]
            self.step = 5

    def send(self, job: tuple[int, bytes, bytes, bytes]) -> None:
        self.job = job
        self.t.write(b"MAIL FROM:" + job[1] + b"\r\n")  # type: ignore[attr-defined]


class AiosmtpdIntake:
    """The same intake on aiosmtpd (``FLOOR_EDGE=aiosmtpd``): what the library adds per message
    over the hand-written protocol above."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: ANN001
        done = asyncio.get_running_loop().create_future()
        self.node.store.write("INSERT INTO q (data) VALUES (?)", (envelope.content,),
                              done.set_result)
        row = await done
        self.node.queued((row, b"<" + envelope.mail_from.encode() + b">",
                          b"<" + envelope.rcpt_tos[0].encode() + b">", envelope.content))
        return "250 2.0.0 OK queued"


async def streams_outbound(node: Node, port: int) -> None:
    """The outbound side on asyncio streams (``FLOOR_RELAY=streams``): a reader that awaits each
    reply line, as a streams-based client does."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> None:
        while (await reader.readline())[3:4] == b"-":
            pass

    await reply()
    writer.write(b"EHLO floor\r\n")
    await reply()
    wake = asyncio.Event()
    while True:
        if not node.queue:
            node.waiters.append(wake)
            await wake.wait()
            wake.clear()
            continue
        row, sender, rcpt, message = node.queue.popleft()
        for line in (b"MAIL FROM:" + sender + b"\r\n", b"RCPT TO:" + rcpt + b"\r\n",
                     b"DATA\r\n", message + b".\r\n"):
            writer.write(line)
            await writer.drain()
            await reply()
        node.delivered(row)


class Node:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.queue: collections.deque = collections.deque()
        self.free: list[Outbound] = []
        self.waiters: list[asyncio.Event] = []  # idle streams-based outbound connections

    def accept(self, sender: bytes, rcpt: bytes, message: bytes, client) -> None:
        def stored(row: int) -> None:
            client.write(b"250 2.0.0 OK queued\r\n")
            self.queued((row, sender, rcpt, message))
        self.store.write("INSERT INTO q (data) VALUES (?)", (message,), stored)

    def queued(self, job: tuple[int, bytes, bytes, bytes]) -> None:
        self.queue.append(job)
        if self.free:
            self.free.pop().send(self.queue.popleft())
        elif self.waiters:
            self.waiters.pop().set()

    def delivered(self, row: int) -> None:
        self.store.write("DELETE FROM q WHERE id = ?", (row,), lambda _: None)

    def idle(self, conn: Outbound) -> None:
        if self.queue:
            conn.send(self.queue.popleft())
        else:
            self.free.append(conn)


async def main(args: dict) -> None:
    loop = asyncio.get_running_loop()
    workdir = Path(args["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    node = Node(Store(workdir / "floor.db", loop))
    edge = os.environ.get("FLOOR_EDGE")
    if edge in ("aiosmtpd", "bulk"):
        from aiosmtpd.smtp import SMTP

        from postlane.edge.smtp import BulkDataSMTP

        handler = AiosmtpdIntake(node)
        kind = SMTP if edge == "aiosmtpd" else BulkDataSMTP
        server = await loop.create_server(lambda: kind(handler, hostname="floor"), "127.0.0.1",
                                          args["port"])
    else:
        server = await loop.create_server(lambda: Intake(node), "127.0.0.1", args["port"])
    outbound = []
    for _ in range(OUTBOUND):
        if os.environ.get("FLOOR_RELAY") == "streams":
            outbound.append(asyncio.create_task(streams_outbound(node, args["sink_port"])))
        else:
            await loop.create_connection(lambda: Outbound(node), "127.0.0.1", args["sink_port"])
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    os.nice(0)
    uvloop.run(main(json.loads(sys.argv[1])))
