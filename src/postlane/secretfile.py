"""Secret files (API token, feedback key, DKIM keys): created once, mode 0600, atomically.

Nodes of a cluster may share a state folder and start at the same moment; a file opened with
O_EXCL and then written can be read empty in between, so the secret is written to a private
temporary file first and linked into place, which fails if another process got there first.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["create_secret"]


def create_secret(path: Path, data: bytes) -> bool:
    """Write ``data`` to a new 0600 file at ``path``, durably; False (and ``path`` untouched)
    if it exists already."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return True
