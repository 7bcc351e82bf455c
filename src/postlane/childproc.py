"""Child processes the node feeds over a socket pair (DKIM signers, the recorder):
length-prefixed ``marshal`` frames, and stopping a child that does not exit by itself."""

from __future__ import annotations

import marshal
import struct
import subprocess
from collections.abc import Iterator
from typing import Any, BinaryIO

__all__ = ["HEAD", "frame", "read_frame", "reap"]

HEAD = struct.Struct("!I")
"""The frame header: the length of the marshalled body."""


def frame(obj: Any) -> bytes:
    data = marshal.dumps(obj)
    return HEAD.pack(len(data)) + data


def frames(buf: bytearray) -> Iterator[Any]:
    """The whole frames at the start of ``buf`` (bytes an asyncio protocol received), each
    taken out of it as it is yielded; a partial frame stays for the next data."""
    while len(buf) >= HEAD.size:
        (size,) = HEAD.unpack_from(buf)
        end = HEAD.size + size
        if len(buf) < end:
            return
        obj = marshal.loads(bytes(buf[HEAD.size:end]))
        del buf[:end]
        yield obj


def read_frame(reader: BinaryIO) -> Any:
    """The next frame's object; EOFError when the other side has gone (mid-frame too)."""
    head = reader.read(HEAD.size)
    if len(head) < HEAD.size:
        raise EOFError
    size = HEAD.unpack(head)[0]
    data = reader.read(size)
    if len(data) < size:
        raise EOFError
    return marshal.loads(data)


def reap(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for ``proc`` to exit, killing it after ``timeout`` seconds."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
