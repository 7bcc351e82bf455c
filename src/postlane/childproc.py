"""Child processes the node feeds over a socket pair (DKIM signers, the recorder):
length-prefixed ``marshal`` frames, and stopping a child that does not exit by itself."""

from __future__ import annotations

import marshal
import struct
import subprocess
from typing import Any, BinaryIO

__all__ = ["HEAD", "frame", "read_frame", "reap"]

HEAD = struct.Struct("!I")
"""The frame header: the length of the marshalled body."""


def frame(obj: Any) -> bytes:
    data = marshal.dumps(obj)
    return HEAD.pack(len(data)) + data


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
