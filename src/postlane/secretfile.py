"""Secret files (API token, feedback key, DKIM keys): created once, mode 0600, atomically.

Nodes of a cluster may share a state folder and start at the same moment; a file opened with
O_EXCL and then written can be read empty in between, so the secret is written to a private
temporary file first and linked into place, which fails if another process got there first.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["create_secret"]


def create_secret(path: Path, data: bytes) -> bool:
    """Write ``data`` to a new 0600 file at ``path``, durably; False (and ``path`` untouched)
    if it exists already."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
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
