"""DKIM signatures computed in child processes, so signing uses the second core.

Why a process of our own and not a thread or ``concurrent.futures``: the node's event loop
already fills one core, and every handoff to a signing thread costs the loop the GIL.
Measured here (10 KB message, RSA-2048, ``sign()`` alone 320 µs of CPU): through a
``ThreadPoolExecutor`` 430–475 µs of the node's CPU per signature, and the signing thread
waits for the GIL behind the busy loop; through a ``ProcessPoolExecutor`` 150–175 µs of the
node's CPU per signature (its feeder and manager threads pickle and poll). A child on a
socket pair, with length-prefixed ``marshal`` frames read by an asyncio protocol, costs the loop
one write and one read per message.

The body follows its request frame as raw bytes, written in blocks as the socket takes them
(``pause_writing``): marshalling it into the frame, ``writelines`` joining the frames and the
transport buffering what the socket had not taken made three copies of a 25 MB message in the
node at once.

The child holds private keys only in memory; it gets each key (DER, PKCS#8) over the socket
before the first signature that needs it, and exits when the socket closes (node gone). If it
dies, the signatures in flight fail with ``SigningUnavailable`` (intake answers 451, so
nothing accepted is lost) and the next message starts a new child.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from ..childproc import frame, frames, read_frame, reap
from ..config.model import DKIMConfig, DKIMKeyConfig

log = logging.getLogger("postlane.dkim")

_BLOCK = 256 * 1024
"""Bytes of a body handed to the transport at a time."""


class SigningUnavailable(Exception):
    """The signing process is gone; the message can be retried."""


class SigningProcess(asyncio.Protocol):
    """One child process; signatures are answered in the order they were asked."""

    def __init__(self, name: str, config: DKIMConfig) -> None:
        self.name = name
        self.settings = (config.canonicalization, list(config.headers), list(config.oversign))
        self._proc: subprocess.Popen | None = None
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._keys: set[int] = set()
        self._next = 0
        self._buffer = bytearray()
        self._starting = asyncio.Lock()
        self._closing = False
        self._writing = asyncio.Lock()
        """One request (frame and body) at a time on the socket."""
        self._can_write = asyncio.Event()
        self._can_write.set()

    async def start(self) -> None:
        async with self._starting:
            if self._transport is not None:
                return
            mine, theirs = socket.socketpair()
            try:  # fork and exec in a thread: the loop goes on serving meanwhile
                self._proc = await asyncio.to_thread(
                    subprocess.Popen,
                    [sys.executable, "-m", "postlane.policy.signing", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
            finally:
                theirs.close()
            self._keys.clear()
            self._buffer.clear()
            self._closing = False
            self._can_write.set()
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_unix_connection(lambda: self, sock=mine)
            self._transport.write(frame(("hello", *self.settings)))

    def backlog(self) -> int:
        """Signatures asked and not yet answered (the signer picks the least busy process)."""
        return len(self._pending)

    async def sign(self, fields: Sequence[tuple[str, bytes]], body: bytes | memoryview,
                   domain: str, keys: Sequence[tuple[int, DKIMKeyConfig, bytes]],
                   now: float) -> bytes:
        """DKIM-Signature field(s) for the message; ``keys`` are (key id, config, DER)."""
        if self._transport is None:
            await self.start()
        future = asyncio.get_running_loop().create_future()
        async with self._writing:
            transport = self._transport
            if transport is None:  # the child ended while another request was written
                raise SigningUnavailable("the signing process ended")
            out = []
            for key_id, cfg, der in keys:
                if key_id not in self._keys:
                    out.append(frame(("key", key_id, cfg.algorithm, der)))
                    self._keys.add(key_id)
            self._next += 1
            ask = self._next
            view = memoryview(body).cast("B")
            out.append(frame(("sign", ask, domain,
                               [(k, c.algorithm, c.selector) for k, c, _ in keys],
                               now, list(fields), len(view))))
            self._pending[ask] = future
            if len(view) <= _BLOCK:  # the common case: frame and body in one write, as before
                transport.write(b"".join((*out, view)))
            else:
                transport.write(b"".join(out))
                try:
                    for start in range(0, len(view), _BLOCK):
                        await self._can_write.wait()
                        if transport.is_closing():  # connection_lost fails the future
                            break
                        transport.write(view[start:start + _BLOCK])
                except BaseException:  # cancelled mid-body: the child would read the next
                    self._pending.pop(ask, None)  # request as the rest of this body, so it
                    transport.abort()  # goes, and the next signature starts a new one
                    raise
        return await future

    # -- flow control (asyncio.Protocol) --

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- asyncio.Protocol --

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for ask, ok, value in frames(self._buffer):
            future = self._pending.pop(ask, None)
            if future is None or future.done():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(SigningUnavailable(value))

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._can_write.set()  # a body half written goes no further (its future fails)
        pending, self._pending = self._pending, {}
        if pending:
            log.error("signing process %s ended with %d signatures in flight", self.name,
                      len(pending))
        for future in pending.values():
            if not future.done():
                future.set_exception(SigningUnavailable("the signing process ended"))
        if self._proc is not None and self._proc.poll() is None and not self._closing:
            # collect its exit status in a thread (a child that does not exit at once must
            # not hold up the loop); the next signature starts a new child meanwhile
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(_collect, self._proc, 1.0))
            _collecting.add(task)
            task.add_done_callback(_collecting.discard)

    def close(self) -> None:
        """Stop the child, waiting for it here (outside the event loop: use ``stop``)."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()  # it ignores SIGTERM (see the child) and has nothing to save
            reap(self._proc, 5)

    async def stop(self) -> None:
        """``close`` for the event loop: the wait for the child's exit runs in a thread."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()  # it ignores SIGTERM (see the child) and has nothing to save
            await asyncio.to_thread(reap, self._proc, 5)


_collecting: set[asyncio.Task] = set()
"""Exit statuses being collected (a reference keeps each task alive until it is done)."""


def _collect(proc: subprocess.Popen, timeout: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


# -- the child ------------------------------------------------------------------------------------

def _serve(fd: int) -> None:
    from cryptography.hazmat.primitives import serialization

    from .dkim import sign

    sock = socket.socket(fileno=fd)
    reader = sock.makefile("rb")
    config = DKIMConfig()
    keys: dict[int, Any] = {}
    while True:
        try:
            msg = read_frame(reader)
        except EOFError:
            return
        op = msg[0]
        if op == "hello":
            config = DKIMConfig(canonicalization=msg[1], headers=msg[2], oversign=msg[3])
        elif op == "key":
            keys[msg[1]] = serialization.load_der_private_key(msg[3], password=None)
        else:
            _, ask, domain, wanted, now, fields, size = msg
            body = reader.read(size)  # the body follows its frame, raw
            if len(body) < size:
                return
            try:
                pairs = [(DKIMKeyConfig(domain=domain, selector=selector, algorithm=algorithm,
                                        key_file="-"), keys[key_id])
                         for key_id, algorithm, selector in wanted]
                reply: tuple[int, bool, bytes | str] = (
                    ask, True, sign(fields, body, domain, pairs, now, config))
            except Exception as exc:  # noqa: BLE001 - answered, never fatal for the child
                reply = (ask, False, f"{type(exc).__name__}: {exc}")
            sock.sendall(frame(reply))


if __name__ == "__main__":
    # Ctrl-C in a terminal, and SIGTERM from systemd's control-group stop, reach the whole
    # process group: the node drains, and this child keeps signing until the node closes the
    # socket and kills it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        _serve(int(sys.argv[1]))
